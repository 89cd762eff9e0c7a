"""One data definition per run: corpus -> documents -> train/validation split -> tokens -> fixed-length blocks.

Sources are local files or folders (text, jsonl/json, parquet) loaded through `datasets`, or `stdlib`: the Python
standard library source of the running interpreter, a real corpus present on every machine.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMATS = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Corpus, split and packing. Defaults give the embedded stdlib corpus."""

    source: str = "stdlib"  # "stdlib", a file, a folder, or a glob
    format: str = "auto"  # auto | text | json | parquet
    text_field: str = "text"  # column holding the text (json / parquet)
    file_glob: str = "**/*.py"  # files to take from a folder source
    max_files: int | None = 400  # documents (files) to use; None = all
    val_fraction: float = 0.1  # fraction of documents held out for validation (at least one)
    block_size: int = 256
    max_train_blocks: int | None = None
    max_val_blocks: int | None = 64
    num_calibration: int = 16  # blocks drawn from train for pruning / quantization calibration
    seed: int = 0
    tokenizer_vocab_size: int = 4096  # only when no teacher tokenizer is given (a BPE is trained)


@dataclass
class DataBundle:
    """Token blocks `[N, block_size]` (int64) for training, validation and calibration, plus provenance."""

    train: torch.Tensor
    val: torch.Tensor
    calibration: torch.Tensor
    tokenizer: object
    stats: dict = field(default_factory=dict)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def source_files(cfg: DataConfig) -> list[Path]:
    """The files of a source, sorted, then a seeded sample of `max_files` of them."""
    if cfg.source == "stdlib":
        files = stdlib_files()
    else:
        path = Path(cfg.source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.glob(cfg.file_glob) if p.is_file())
        else:
            import glob

            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data.source {cfg.source!r} matches no files (file_glob={cfg.file_glob!r})")
    if cfg.max_files is not None and len(files) > cfg.max_files:
        rng = random.Random(cfg.seed)
        files = sorted(rng.sample(files, cfg.max_files))
    return files


def _format(cfg: DataConfig, files: list[Path]) -> str:
    if cfg.format != "auto":
        if cfg.format not in ("text", "json", "parquet"):
            raise ValueError(f"data.format {cfg.format!r} is not one of auto, text, json, parquet")
        return cfg.format
    kinds = {FORMATS.get(f.suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise ValueError(f"data.source mixes formats {sorted(kinds)}; set data.format or narrow data.file_glob")
    return kinds.pop()


def load_documents(cfg: DataConfig):
    """A `datasets.Dataset` with one `text` row per document (a whole file for text sources)."""
    import datasets

    files = source_files(cfg)
    fmt = _format(cfg, files)
    data_files = [str(f) for f in files]
    if fmt == "text":
        ds = datasets.load_dataset("text", data_files=data_files, sample_by="document", split="train",
                                   encoding_errors="replace",
                                   keep_in_memory=True)
        field_name = "text"
    else:
        ds = datasets.load_dataset(fmt, data_files=data_files, split="train", keep_in_memory=True)
        field_name = cfg.text_field
    if field_name not in ds.column_names:
        raise KeyError(f"data.text_field {field_name!r} is not a column of {cfg.source}; columns: {ds.column_names}")
    if field_name != "text":
        ds = ds.rename_column(field_name, "text")
    ds = ds.select_columns(["text"]).filter(lambda row: bool(row["text"] and row["text"].strip()),
                                            keep_in_memory=True)
    if len(ds) < 2:
        raise ValueError(f"data.source {cfg.source!r} gives {len(ds)} non-empty document(s); need at least 2 "
                         "to hold one out for validation")
    return ds


def split_documents(ds, cfg: DataConfig):
    """Deterministic document-level split: the same seed gives the same held-out documents."""
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    n_val = min(len(ds) - 1, max(1, round(len(ds) * cfg.val_fraction)))
    parts = ds.train_test_split(test_size=n_val, seed=cfg.seed, shuffle=True, keep_in_memory=True)
    return parts["train"], parts["test"]


def pack(ds, tokenizer, block_size: int, max_blocks: int | None) -> torch.Tensor:
    """Tokenize documents, join them with EOS, and cut the stream into `[N, block_size]` blocks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; documents could not be separated")

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    tokens = ds.map(tokenize, batched=True, remove_columns=["text"], keep_in_memory=True,
                    desc="tokenizing")["ids"]
    stream = np.fromiter((t for doc in tokens for t in doc), dtype=np.int64)
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the corpus gives {len(stream)} tokens, fewer than one block of {block_size}; "
                         "lower data.block_size or add documents")
    return torch.from_numpy(stream[: n * block_size].reshape(n, block_size).copy())


def build_data(cfg: DataConfig, tokenizer=None) -> DataBundle:
    """Build train / validation / calibration blocks. Without a tokenizer, a byte-level BPE is trained on the
    training documents (so validation text never shapes the vocabulary)."""
    if cfg.block_size < 2:
        raise ValueError(f"data.block_size must be >= 2, got {cfg.block_size}")
    docs = load_documents(cfg)
    train_docs, val_docs = split_documents(docs, cfg)
    if tokenizer is None:
        from .tokenizer import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer(train_docs["text"], cfg.tokenizer_vocab_size)
    train = pack(train_docs, tokenizer, cfg.block_size, cfg.max_train_blocks)
    val = pack(val_docs, tokenizer, cfg.block_size, cfg.max_val_blocks)
    g = torch.Generator().manual_seed(cfg.seed)
    calibration = train[torch.randperm(len(train), generator=g)[: cfg.num_calibration]]
    stats = {"documents_train": len(train_docs), "documents_val": len(val_docs),
             "blocks_train": len(train), "blocks_val": len(val), "tokens_train": train.numel(),
             "tokens_val": val.numel()}
    return DataBundle(train=train, val=val, calibration=calibration, tokenizer=tokenizer, stats=stats)
