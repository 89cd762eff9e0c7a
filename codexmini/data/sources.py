"""Where documents come from: the stdlib, this machine's other text, local files / folders / globs, and folders
written by `datasets.save_to_disk`. Each source gives a `datasets.Dataset` with one `text` row per document.

A file's format comes from its full suffix (`.jsonl.gz` is gzipped json lines, not text), so compressed json is
read as rows and never trained on as escaped JSON.
"""

from __future__ import annotations

import glob
import random
import sysconfig
from pathlib import Path

from .machine_text import machine_documents, machine_files
from .schema import DataConfig, SourceConfig

# Full suffix -> the `datasets` builder that reads it (gzip / bz2 / xz / zstd are decompressed by `datasets`).
SUFFIX_FORMATS = {
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet", ".arrow": "arrow",
    ".txt": "text", ".md": "text", ".rst": "text", ".py": "text",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
BUILDERS = {"text": "text", "json": "json", "jsonl": "json", "parquet": "parquet", "arrow": "arrow"}
_GLOB_CHARS = set("*?[")


class MissingSource(FileNotFoundError, ValueError):
    """A source names a file, folder or glob that is not there (a ValueError too: a config error)."""


class MissingColumn(KeyError, ValueError):
    """A source's text_field is not one of its columns (a ValueError too: a config error)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def file_format(path: Path) -> str:
    """The builder for one file from its full suffix: `a.jsonl.gz` -> json, `b.parquet` -> parquet; else text."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return SUFFIX_FORMATS.get(suffixes[-1], "text") if suffixes else "text"


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def source_files(src: SourceConfig | DataConfig, seed: int | None = None, key: str | None = None) -> list[Path]:
    """The files of a source, sorted, then a seeded sample of `max_files` of them.

    `src` may be a DataConfig in its single-source form (its seed is used). `key` names the source in errors.
    """
    if isinstance(src, DataConfig):
        if src.sources:
            raise ValueError("source_files takes one source; call it for each of data.sources")
        seed = src.seed if seed is None else seed
        src = src.resolved_sources()[0][1]
    key = key or "data"
    seed = 0 if seed is None else seed
    if src.source == "stdlib":
        files = stdlib_files()
    elif src.source == "machine_text":
        files = machine_files(src.kind)
    elif src.source == "teacher":
        raise ValueError(f"{key}.source=teacher has no files")
    else:
        files = _path_files(src, key)
    if src.max_files is not None and len(files) > src.max_files:
        rng = random.Random(seed)
        files = sorted(rng.sample(files, src.max_files))
    return files


def _path_files(src: SourceConfig, key: str) -> list[Path]:
    path = Path(src.source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob(src.file_glob) if p.is_file())
        if not files:
            raise MissingSource(f"{key}.source folder {str(path)!r} has no files matching "
                                f"{key}.file_glob={src.file_glob!r}")
        return files
    if _GLOB_CHARS & set(src.source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise MissingSource(f"{key}.source {src.source!r} matches no files")
        return files
    raise MissingSource(f"{key}.source {src.source!r}: no such file or folder")


def source_format(src: SourceConfig, files: list[Path], key: str = "data") -> str:
    """The one `datasets` builder for a source's files (`format` set, or the same suffix format for all)."""
    if src.format != "auto":
        if src.format not in BUILDERS:
            raise ValueError(f"{key}.format {src.format!r} is not one of auto, {', '.join(BUILDERS)}")
        return BUILDERS[src.format]
    kinds = {file_format(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{key}.source {src.source!r} mixes formats {sorted(kinds)}; set {key}.format or narrow "
                         f"{key}.file_glob")
    return kinds.pop()


def load_saved_dataset(path: Path, key: str = "data"):
    """A `datasets.Dataset` from a save_to_disk folder; for a DatasetDict its `train` split (or its only one)."""
    import datasets

    ds = datasets.load_from_disk(str(path), keep_in_memory=True)
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise ValueError(f"{key}.source {str(path)!r} is a DatasetDict with splits {sorted(ds)} and no 'train'; "
                         "save the split to use with Dataset.save_to_disk")
    return ds


def load_source_documents(src: SourceConfig, seed: int = 0, key: str = "data", min_docs: int = 2):
    """A `datasets.Dataset` with one non-empty `text` row per document (a whole file for text formats).

    Raises MissingSource / MissingColumn / ValueError naming `key` (`data` or `data.sources[i]`).
    """
    import datasets

    path = Path(src.source).expanduser()
    if src.source == "machine_text":
        ds = datasets.Dataset.from_dict({"text": machine_documents(src.kind, source_files(src, seed, key))})
        where, field_name = f"machine_text kind {src.kind!r}", "text"
    elif src.source not in ("stdlib", "teacher") and is_saved_dataset(path):
        ds, where, field_name = load_saved_dataset(path, key), str(path), src.text_field
    else:
        files = source_files(src, seed, key)
        fmt = source_format(src, files, key)
        data_files = [str(f) for f in files]
        where = src.source
        if fmt == "text":
            ds = datasets.load_dataset("text", data_files=data_files, sample_by="document", split="train",
                                       encoding_errors="replace", keep_in_memory=True)
            field_name = "text"
        else:
            ds = datasets.load_dataset(fmt, data_files=data_files, split="train", keep_in_memory=True)
            field_name = src.text_field
    if field_name not in ds.column_names:
        raise MissingColumn(f"{key}.text_field {field_name!r} is not a column of {where}; columns: "
                            f"{ds.column_names}")
    dtype = getattr(ds.features[field_name], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(f"{key}.text_field {field_name!r} of {where} holds {ds.features[field_name]}, not text")
    if field_name != "text":
        ds = ds.select_columns([field_name]).rename_column(field_name, "text")
    ds = ds.select_columns(["text"]).filter(lambda row: bool(row["text"] and row["text"].strip()),
                                            keep_in_memory=True)
    if src.max_docs is not None and len(ds) > src.max_docs:
        keep = sorted(random.Random(seed).sample(range(len(ds)), src.max_docs))
        ds = ds.select(keep, keep_in_memory=True)
    if len(ds) < min_docs:
        need = "to hold one out for validation" if min_docs > 1 else "to validate on"
        raise ValueError(f"{key}.source {src.source!r} gives {len(ds)} non-empty document(s); need at least "
                         f"{min_docs} {need}")
    return ds
