"""Sources and mixtures, teacher-generated data, tokenizers, packing, calibration batches, and the shared
evaluation: perplexity over all held-out blocks and perplexity / KL from the teacher per domain."""

from .checks import check_data_config
from .corpus import DataBundle, build_data, load_documents, pack, split_documents
from .domains import evaluate_domains
from .machine_text import machine_files
from .perplexity import perplexity
from .schema import DataConfig, SourceConfig
from .sources import MissingColumn, MissingSource, source_files, stdlib_files
from .teacher_gen import generate_batch, load_prompts, model_fingerprint, teacher_samples
from .tokenizer import train_bpe_tokenizer

__all__ = ["DataBundle", "DataConfig", "MissingColumn", "MissingSource", "SourceConfig", "build_data",
           "check_data_config", "evaluate_domains", "generate_batch", "load_documents", "load_prompts",
           "machine_files", "model_fingerprint", "pack", "perplexity", "source_files", "split_documents",
           "stdlib_files", "teacher_samples", "train_bpe_tokenizer"]
