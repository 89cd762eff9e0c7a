"""One data definition per run: sources -> documents -> per-domain train/validation split -> tokens -> blocks.

Each source is a domain. Its documents (files, rows, or teacher samples) are split into training and held-out
documents with the run's seed, each part is packed into fixed-length blocks, and the training blocks of all
domains are interleaved by weight (`mixture.py`). Validation stays per domain (`DataBundle.val_domains`) and
`DataBundle.val` holds all of them, so every stage measures every domain on the same held-out blocks.

Sources (see `SourceConfig`): `stdlib` (the Python standard library source of the running interpreter, a real
corpus on every machine), `machine_text` (licences, docs, man pages, other projects' code found on this machine),
`teacher` (samples from the teacher), local files / folders / globs (text, json / jsonl, parquet, arrow, gzipped
too) and `datasets.save_to_disk` folders.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_data_config
from .dedup import near_duplicate_groups
from .mixture import interleave_blocks, round_robin
from .schema import DataConfig, SourceConfig, as_data_config
from .sources import load_source_documents, source_files, stdlib_files

__all__ = ["DataBundle", "DataConfig", "SourceConfig", "build_data", "load_documents", "pack", "source_files",
           "split_documents", "stdlib_files"]

_TOKENIZE_BATCH = 1000


@dataclass
class DataBundle:
    """Token blocks `[N, block_size]` (int64) for training, validation and calibration, plus provenance.

    train: every training domain's blocks, interleaved by weight. val: every domain's held-out blocks (taken in
    turn across domains), what a stage's single perplexity is measured on. val_domains: the same held-out blocks by
    domain, eval_only domains included. calibration: training blocks of every training domain in turn.
    """

    train: torch.Tensor
    val: torch.Tensor
    calibration: torch.Tensor
    tokenizer: object
    stats: dict = field(default_factory=dict)
    val_domains: dict[str, torch.Tensor] = field(default_factory=dict)


def split_documents(ds, cfg: DataConfig, val_fraction: float | None = None, key: str = "data"):
    """Deterministic document-level split: the same seed gives the same held-out documents.

    Near-duplicate documents (`dedup.near_duplicate_groups`: man pages of one tool family, one licence under two
    names) stay on one side, so the held-out part is text the training part does not contain. Groups are drawn in
    a seeded order until the held-out part has its share of documents; a group that would overshoot it is left for
    training. Both parts come out shuffled (a domain's first blocks are not its A-files). Where every document is a
    near-duplicate of the others, the split falls back to single documents.
    """
    fraction = cfg.val_fraction if val_fraction is None else val_fraction
    if not 0 < fraction < 1:
        where = "data.val_fraction" if val_fraction is None else f"{key}.val_fraction"
        raise ValueError(f"{where} must be in (0, 1), got {fraction}")
    n_val = min(len(ds) - 1, max(1, round(len(ds) * fraction)))
    groups = near_duplicate_groups(ds["text"])
    if max(groups, default=0) == 0:  # one group: nothing to keep apart
        parts = ds.train_test_split(test_size=n_val, seed=cfg.seed, shuffle=True, keep_in_memory=True)
        return parts["train"], parts["test"]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = np.random.default_rng(cfg.seed).permutation(len(members))
    val: list[int] = []
    for g in order.tolist():
        if len(val) + len(members[g]) <= n_val:
            val.extend(members[g])
        if len(val) == n_val:
            break
    if not val:  # every group is bigger than the held-out share: the smallest one goes
        val = min(members.values(), key=len)
    held = set(val)
    train = [i for i in np.random.default_rng(cfg.seed + 1).permutation(len(ds)).tolist() if i not in held]
    return ds.select(train, keep_in_memory=True), ds.select(val, keep_in_memory=True)


def pack(ds, tokenizer, block_size: int, max_blocks: int | None, what: str = "the corpus") -> torch.Tensor:
    """Tokenize documents, join them with EOS, and cut the stream into `[N, block_size]` blocks.

    With `max_blocks`, tokenizing stops once enough tokens are there (a large source costs what it gives).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; documents could not be separated")
    need = None if max_blocks is None else max_blocks * block_size
    pieces, count = [], 0
    for start in range(0, len(ds), _TOKENIZE_BATCH):
        texts = ds[start:start + _TOKENIZE_BATCH]["text"]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=np.int64))
            count += len(ids) + 1
        if need is not None and count >= need:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"{what} gives {len(stream)} tokens, fewer than one block of {block_size}; "
                         "lower data.block_size or add documents")
    return torch.from_numpy(stream[: n * block_size].reshape(n, block_size).copy())


def _skip_machine_text(src: SourceConfig, err: Exception) -> bool:
    """A machine_text source that finds too little on this machine is left out, not fatal."""
    return src.source == "machine_text" and isinstance(err, ValueError)


def load_documents(cfg: DataConfig):
    """A `datasets.Dataset` with one `text` row per document (a whole file for text sources).

    For a mixture, the documents of every training source that has files (teacher and eval_only sources left
    out), one after another: the corpus a tokenizer (or a tiny teacher) can be trained on before a teacher exists.
    """
    import datasets

    cfg = as_data_config(cfg)
    if not cfg.sources:
        key, src = cfg.resolved_sources()[0]
        return load_source_documents(src, cfg.seed, key)
    parts = []
    for key, src in cfg.resolved_sources():
        if src.source == "teacher" or src.eval_only:
            continue
        try:
            parts.append(load_source_documents(src, cfg.seed, key))
        except ValueError as err:
            if not _skip_machine_text(src, err):
                raise
    if not parts:
        raise ValueError("data.sources: no training source with files (teacher / eval_only sources aside)")
    return datasets.concatenate_datasets(parts)


def build_data(cfg: DataConfig, tokenizer=None, teacher=None, progress: bool = True) -> DataBundle:
    """Build train / validation / calibration blocks, per domain and mixed.

    Args:
        cfg: the data section (a DataConfig or its dict).
        tokenizer: the teacher's tokenizer. None: a byte-level BPE is trained on the training documents (so
            validation text never shapes the vocabulary); not possible with a `source: teacher`.
        teacher: the teacher model, needed by `source: teacher` sources (its samples are generated once and
            cached, see `teacher_gen`).
        progress: progress bars for teacher generation.
    """
    cfg = as_data_config(cfg)
    check_data_config(cfg)
    domains: dict[str, dict] = {}  # name -> {"src", "key", "train" (Dataset | None), "val" (Dataset)}
    skipped: dict[str, str] = {}
    generation: dict[str, dict] = {}
    for key, src in cfg.resolved_sources():
        if src.source == "teacher":
            from .teacher_gen import teacher_documents

            train_docs, val_docs, generation[src.name] = teacher_documents(src, cfg, tokenizer, teacher, key,
                                                                           progress)
        else:
            try:
                docs = load_source_documents(src, cfg.seed, key, min_docs=1 if src.eval_only else 2)
            except ValueError as err:
                if not _skip_machine_text(src, err):
                    raise
                skipped[src.name] = str(err)
                warnings.warn(f"data: leaving out domain {src.name!r}: {err}", stacklevel=2)
                continue
            if src.eval_only:  # shuffled like a split's held-out part, so the blocks kept are not A-first
                train_docs, val_docs = None, docs.shuffle(seed=cfg.seed, keep_in_memory=True)
            else:
                train_docs, val_docs = split_documents(docs, cfg, src.val_fraction, key)
        domains[src.name] = {"src": src, "key": key, "train": train_docs, "val": val_docs}
    training = [name for name, d in domains.items() if d["train"] is not None]
    if not training:
        raise ValueError("data: no training domain is left (every source is eval_only or found nothing on this "
                         f"machine: {skipped})")

    if tokenizer is None:
        from .tokenizer import train_bpe_tokenizer

        texts = [t for name in training for t in domains[name]["train"]["text"]]
        tokenizer = train_bpe_tokenizer(texts, cfg.tokenizer_vocab_size)

    train_blocks, val_domains = {}, {}
    for name, d in domains.items():
        try:
            train_part = None if d["train"] is None else pack(
                d["train"], tokenizer, cfg.block_size, cfg.max_train_blocks,
                f"{d['key']} ({name!r}) training documents")
            val_part = pack(d["val"], tokenizer, cfg.block_size, cfg.max_val_blocks,
                            f"{d['key']} ({name!r}) validation documents")
        except ValueError as err:
            if not _skip_machine_text(d["src"], err):
                raise
            skipped[name] = str(err)
            warnings.warn(f"data: leaving out domain {name!r}: {err}", stacklevel=2)
            continue
        if train_part is not None:
            train_blocks[name] = train_part
        val_domains[name] = val_part
    training = list(train_blocks)
    if not training:
        raise ValueError(f"data: no training domain is left (too little text found on this machine: {skipped})")
    weights = {name: domains[name]["src"].weight for name in training}
    train, train_domain = interleave_blocks(train_blocks, weights, cfg.seed, cfg.mixture_stopping,
                                            cfg.max_train_blocks)
    val = round_robin(val_domains)
    # calibration: the training domains in turn (each domain's blocks shuffled), so that pruning and quantization
    # weigh every kind of text alike, not in proportion to the training weights (45% stdlib in the quickstart)
    calibration = train[:0]
    if cfg.num_calibration:
        g = torch.Generator().manual_seed(cfg.seed)
        calibration = round_robin({name: blocks[torch.randperm(len(blocks), generator=g)[: cfg.num_calibration]]
                                   for name, blocks in train_blocks.items()})[: cfg.num_calibration]

    total_weight = sum(weights.values())
    per_domain = {}
    for name in val_domains:
        d, src = domains[name], domains[name]["src"]
        per_domain[name] = {
            "source": src.source, **({"kind": src.kind} if src.kind else {}), "eval_only": src.eval_only,
            "weight": weights[name] / total_weight if name in weights else 0.0,
            "documents_train": len(d["train"]) if d["train"] is not None else 0, "documents_val": len(d["val"]),
            "blocks_train": train_domain.count(name), "blocks_val": len(val_domains[name]),
            "tokens_val": val_domains[name].numel()}
    stats = {"documents_train": sum(len(domains[n]["train"]) for n in training),
             "documents_val": sum(len(domains[n]["val"]) for n in val_domains),
             "blocks_train": len(train), "blocks_val": len(val), "tokens_train": train.numel(),
             "tokens_val": val.numel(), "domains": per_domain}
    if skipped:
        stats["skipped_domains"] = skipped
    if generation:
        stats["teacher_generation"] = generation
    return DataBundle(train=train, val=val, calibration=calibration, tokenizer=tokenizer, stats=stats,
                      val_domains=val_domains)
