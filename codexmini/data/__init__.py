"""Corpora, tokenizers, packing, calibration batches and the shared perplexity metric."""

from .corpus import DataBundle, DataConfig, build_data, load_documents, source_files, split_documents, stdlib_files
from .perplexity import perplexity
from .tokenizer import train_bpe_tokenizer

__all__ = ["DataBundle", "DataConfig", "build_data", "load_documents", "perplexity", "source_files",
           "split_documents", "stdlib_files", "train_bpe_tokenizer"]
