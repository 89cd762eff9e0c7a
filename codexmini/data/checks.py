"""`data.*` mistakes found before any compute: what a quick look at the config and the files can tell.

`check_data_config` raises a ValueError naming the key (`data.block_size`, `data.sources[1].text_field`, ...). It
reads directory listings, a json file's first line, a parquet / arrow schema and file sizes; it never tokenizes,
never loads a teacher, and never fails because this machine lacks some `machine_text` (that domain is left out
when the data is built).
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

from .machine_text import KINDS
from .schema import DOMAIN_NAME, FORMATS, NAMED_SOURCES, STOPPING, DataConfig, SourceConfig, as_data_config
from .sources import MissingColumn, is_saved_dataset, load_saved_dataset, source_files, source_format

_PEEK_BYTES = 20_000_000  # a .json file (not json lines) is parsed whole for its columns only below this size


def check_data_config(cfg: DataConfig | dict) -> None:
    """Raise ValueError (MissingSource / MissingColumn are ValueErrors too) for the first problem found."""
    cfg = as_data_config(cfg)
    _check_run_fields(cfg)
    seen: dict[str, str] = {}
    resolved = cfg.resolved_sources()
    for key, src in resolved:
        if src.name in seen:
            raise ValueError(f"{key}.name {src.name!r} is also the name of {seen[src.name]}; give each source its "
                             "own name (it names the domain in every metric)")
        seen[src.name] = key
        _check_source(key, src, cfg)
    if all(src.eval_only for _, src in resolved):
        raise ValueError("data.sources: every source is eval_only; at least one must be trained on")


def _check_run_fields(cfg: DataConfig) -> None:
    if not isinstance(cfg.block_size, int) or cfg.block_size < 2:
        raise ValueError(f"data.block_size must be >= 2, got {cfg.block_size}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    for name in ("max_train_blocks", "max_val_blocks"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"data.{name} must be >= 1 or null, got {value}")
    if cfg.num_calibration < 0:
        raise ValueError(f"data.num_calibration must be >= 0, got {cfg.num_calibration}")
    if cfg.mixture_stopping not in STOPPING:
        raise ValueError(f"data.mixture_stopping {cfg.mixture_stopping!r} is not one of {', '.join(STOPPING)}")


def _check_source(key: str, src: SourceConfig, cfg: DataConfig) -> None:
    if not DOMAIN_NAME.match(src.name):
        raise ValueError(f"{key}.name {src.name!r} must be a plain name (letters, digits, '_', '-', '.')")
    if src.format not in FORMATS:
        raise ValueError(f"{key}.format {src.format!r} is not one of {', '.join(FORMATS)}")
    for name in ("max_files", "max_docs"):
        value = getattr(src, name)
        if value is not None and value < 1:
            raise ValueError(f"{key}.{name} must be >= 1 or null, got {value}")
    if not src.eval_only and not (isinstance(src.weight, (int, float)) and math.isfinite(src.weight)
                                  and src.weight > 0):
        raise ValueError(f"{key}.weight must be a positive number, got {src.weight}")
    if src.val_fraction is not None and not 0 < src.val_fraction < 1:
        raise ValueError(f"{key}.val_fraction must be in (0, 1) or null, got {src.val_fraction}")
    if src.source == "machine_text":
        if src.kind not in KINDS:
            hint = "" if key != "data" else " (data.source=machine_text needs a kind: list it under data.sources)"
            raise ValueError(f"{key}.kind {src.kind!r} is not one of {', '.join(KINDS)}{hint}")
        return  # what this machine lacks is left out at build time, not an error
    if src.kind is not None:
        raise ValueError(f"{key}.kind is read only with source=machine_text; got source={src.source!r}")
    if src.source == "teacher":
        _check_teacher(key, src)
        return
    if src.source == "stdlib":
        return
    _check_path_source(key, src, cfg)


def _check_teacher(key: str, src: SourceConfig) -> None:
    from .teacher_gen import load_prompts

    for name in ("num_samples", "max_new_tokens", "gen_batch_size"):
        if getattr(src, name) < 1:
            raise ValueError(f"{key}.{name} must be >= 1, got {getattr(src, name)}")
    if src.temperature < 0:
        raise ValueError(f"{key}.temperature must be >= 0 (0: greedy), got {src.temperature}")
    if not 0 < src.top_p <= 1:
        raise ValueError(f"{key}.top_p must be in (0, 1], got {src.top_p}")
    load_prompts(src.prompts, key)


def _check_path_source(key: str, src: SourceConfig, cfg: DataConfig) -> None:
    path = Path(src.source).expanduser()
    if src.source in NAMED_SOURCES:
        return
    if is_saved_dataset(path):
        try:
            ds = load_saved_dataset(path, key)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{key}.source {str(path)!r} is not a readable save_to_disk folder ({err})") from None
        _check_column(key, src, ds.column_names, str(path))
        return
    files = source_files(src, cfg.seed, key)  # raises MissingSource naming a missing file, folder or glob
    fmt = source_format(src, files, key)
    if fmt != "text":
        columns = _peek_columns(files[0], fmt, key)
        if columns is not None:
            _check_column(key, src, columns, str(files[0]))
    bound = _token_bound(files, fmt)
    need = 1 if src.eval_only else 2  # a block to train on and one to validate on
    if bound is not None and bound < need * cfg.block_size:
        raise ValueError(f"{key}.source {src.source!r} holds at most about {bound} tokens ({len(files)} file(s)), "
                         f"fewer than {need} block(s) of data.block_size={cfg.block_size}; lower data.block_size or "
                         "add documents")


def _check_column(key: str, src: SourceConfig, columns: list[str], where: str) -> None:
    if src.text_field not in columns:
        raise MissingColumn(f"{key}.text_field {src.text_field!r} is not a column of {where}; columns: {columns}")


def _open(path: Path):
    import bz2
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower())
    return opener(path, "rt", encoding="utf-8", errors="replace") if opener else open(
        path, encoding="utf-8", errors="replace")


def _peek_columns(path: Path, fmt: str, key: str) -> list[str] | None:
    """The columns of one file from its first json line or its schema; None when a quick look cannot tell."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if fmt == "arrow":
            import pyarrow as pa

            try:
                with pa.ipc.open_stream(str(path)) as reader:
                    return list(reader.schema.names)
            except pa.ArrowInvalid:
                with pa.ipc.open_file(str(path)) as reader:
                    return list(reader.schema.names)
        if path.suffix.lower() == ".zst":
            return None
        with _open(path) as f:
            first = next((line for line in f if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            row = None
        if row is None and ".jsonl" not in [s.lower() for s in path.suffixes] and \
                path.stat().st_size < _PEEK_BYTES:
            with _open(path) as f:
                row = json.load(f)  # a pretty-printed .json file: a list of records or a dict of columns
            row = row[0] if isinstance(row, list) and row else row
        return list(row) if isinstance(row, dict) else None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}.source: {path} could not be read as {fmt} ({err})") from None
    except Exception as err:  # noqa: BLE001 - pyarrow's own errors (ArrowInvalid, ...) on a damaged file
        raise ValueError(f"{key}.source: {path} could not be read as {fmt} ({type(err).__name__}: {err})") from None


def _token_bound(files: list[Path], fmt: str) -> int | None:
    """An upper bound on the tokens the files can give (a token holds at least one byte, plus one EOS per
    document); None when it cannot be told cheaply (parquet, arrow, bz2 / xz / zstd)."""
    if fmt in ("parquet", "arrow"):
        return None
    total = 0
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".gz":
            size = _gzip_size(path)
            if size is None:
                return None
        elif suffix in (".bz2", ".xz", ".zst"):
            return None
        else:
            size = path.stat().st_size
        total += size + (1 if fmt == "text" else 0)
    return total


def _gzip_size(path: Path) -> int | None:
    """The uncompressed size a single-member gzip file records in its last four bytes (mod 2**32)."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return None
            f.seek(-4, 2)
            size = struct.unpack("<I", f.read(4))[0]
    except OSError:
        return None
    # A file of several gzip members records only its last one's size; the compressed size bounds that case.
    return max(size, path.stat().st_size) if path.stat().st_size < 2**32 else None
