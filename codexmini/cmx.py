"""The `.cmx` on-device checkpoint: one self-describing file, a safetensors container.

Tensors are the model's weights, named as in the PyTorch model: float weights as `<name>` (fp32 or fp16) and
quantized linear layers (and the token table) as `<name>.qweight` / `.scale` (fp16) / `.zero` (asymmetric group
schemes only) / `.min` (fp16, `_min` group schemes only) in the portable layout of `codexmini.ops.layouts` (int8
per output channel; int4 / int3 / int2 in groups along each row). A tied head is the token table, stored once, quantized or not. The safetensors metadata
(all strings) holds:

    format        "codexmini-cmx"
    version       format version (an integer); readers refuse versions newer than they know
    config        the model config as JSON (per-layer sizes and layer types)
    schemes       JSON {linear name (or model.embed_tokens): "int8" | "int<b>_g<group>[_asym|_min]"} for the quantized
                  tensors
    tokenizer     tokenizer.json text;  chat_template  the chat template (may be empty)
    checksum      sha256 over every other metadata entry (name and value, in name order), then every tensor's
                  name, dtype, shape and bytes, in name order (version 1 files: the tensors only)

This module imports only torch, safetensors, the standard library and `codexmini.ops` (the scheme and layer
names): the runtime reads through it alone.
Reading validates everything (container, format, version, every config value the runtime uses, scheme names,
the tokenizer's JSON, every tensor's shape and dtype against the config, then the checksum) and raises one
`CmxError` with a clear message, naming the key; nothing is unpickled. A hand-edited `rope_theta` that is still a
valid value is caught by the checksum (version 2 covers the metadata); a damaged one by the value checks first.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_path
from .ops.layouts import Scheme, check_group_size
from .ops.names import FEATURE_MAPS, LAYER_TYPES

FORMAT = "codexmini-cmx"
# 3: fp16 scales, no zero tensor for symmetric group schemes (their zero is implied), int3 / int2 schemes, a
# quantized table that is also the tied head; 2: the checksum covers the metadata too (1: tensors only). All read.
VERSION = 3
EMBED = "model.embed_tokens"  # the one non-linear tensor that may be quantized
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CmxError(ValueError):
    """A .cmx file that cannot be used, with the reason."""


@dataclass
class CmxFile:
    path: Path
    version: int
    config: dict
    schemes: dict[str, str]
    tokenizer_json: str
    chat_template: str
    tensors: dict[str, torch.Tensor]
    checksum: str
    ranges: dict[str, tuple[int, int]] | None = None  # each tensor's byte range in the file (when mapped)
    mapping: object = None  # the memory map the tensors view (when mapped)

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages under a mapped tensor that the reader no longer reads (e.g. weights it keeps
        repacked elsewhere): the whole pages inside its bytes leave the process's memory; the file's data stays in
        the OS page cache, and reading the tensor again maps it back. Nothing happens for a tensor that is not a
        view of the map."""
        import mmap

        if self.mapping is None or not hasattr(mmap, "MADV_DONTNEED") or t.numel() == 0:
            return
        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))
        start = t.data_ptr() - base
        if not 0 <= start < len(self.mapping):
            return
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
        if hi > lo:
            self.mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _mapped_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]], object]:
    """Every tensor of a safetensors file (already validated by `safe_open`) as a view into a private, copy-on-write
    memory map of the file, with its absolute byte range. Only the pages a reader touches become resident, so a
    runtime's memory is the weights it uses (an embedding table is only read a row at a time)."""
    import mmap
    import struct
    import warnings

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors, ranges = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (8 + n + o for o in info["data_offsets"])
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        if end == begin:
            t = torch.empty(shape, dtype=dtype)
        else:
            with warnings.catch_warnings():  # frombuffer warns about the map's (copy-on-write) writability
                warnings.simplefilter("ignore")
                t = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=begin)
            t = t.view(dtype).reshape(shape)
        tensors[name], ranges[name] = t, (begin, end)
    return tensors, ranges, mm


def _metadata_digest(h, meta: dict[str, str]) -> None:
    """Feed every metadata entry but the checksum itself into `h`: name and value, each length-prefixed (so no
    two different metadata can hash alike), in name order."""
    for key in sorted(k for k in meta if k != "checksum"):
        for part in (key.encode(), str(meta[key]).encode("utf-8", errors="surrogatepass")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)


def _checksum_label(name: str, t: torch.Tensor) -> bytes:
    """What the checksum hashes before a tensor's bytes (its name, dtype and shape)."""
    return f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()


def _file_checksum(path: Path, tensors: dict[str, torch.Tensor], ranges: dict[str, tuple[int, int]],
                   meta: dict[str, str] | None = None) -> str:
    """`payload_checksum` computed with plain reads of the file: the same digest, without making the mapped
    tensors' pages resident in this process."""
    h = hashlib.sha256()
    if meta is not None:
        _metadata_digest(h, meta)
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as fh:
        for name in sorted(tensors):
            h.update(_checksum_label(name, tensors[name]))
            begin, end = ranges[name]
            fh.seek(begin)
            left = end - begin
            while left:
                got = fh.readinto(memoryview(buf)[:min(left, len(buf))])
                if not got:
                    raise CmxError(f"{path}: truncated while reading tensor {name!r}")
                h.update(memoryview(buf)[:got])
                left -= got
    return h.hexdigest()


def payload_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """The file's checksum: the metadata (all but `checksum`; version 2) then the tensors. `meta=None` gives a
    version 1 checksum (tensors only)."""
    h = hashlib.sha256()
    if meta is not None:
        _metadata_digest(h, meta)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(_checksum_label(name, t))
        if t.numel():  # hashed through the buffer protocol: no copy of the tensor
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_cmx(path: str | Path, tensors: dict[str, torch.Tensor], config: dict, schemes: dict[str, str],
              tokenizer_json: str, chat_template: str = "") -> Path:
    """Validate and write a .cmx file atomically (temporary file + rename). Returns the path."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_metadata(config, schemes, tokenizer_json)
    check_contents(config, schemes, tensors)
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config, sort_keys=True, allow_nan=False),
            "schemes": json.dumps(schemes, sort_keys=True), "tokenizer": tokenizer_json,
            "chat_template": chat_template or ""}
    meta["checksum"] = payload_checksum(tensors, meta)
    return save_safetensors_atomic(tensors, path, meta)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """`safetensors.torch.save_file` to a temporary file beside `path`, then rename: never half-written."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def read_cmx(path: str | Path, verify_checksum: bool = True, mmap: bool = False) -> CmxFile:
    """Read and validate a .cmx file; any problem raises `CmxError` naming it. `mmap=True` (what the runtime uses)
    maps the tensors from the file instead of copying them: pages are read when first touched, the checksum is
    computed with plain reads."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CmxError(f"{path}: no such file")
    ranges = mapping = None
    try:
        with safe_open(str(path), framework="pt") as f:  # the library validates the container
            meta = f.metadata() or {}
            if mmap:
                tensors, ranges, mapping = _mapped_tensors(path)
            else:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CmxError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - safetensors raises its own types (a Rust panic is a BaseException)
        raise CmxError(f"{path}: not a readable .cmx file (truncated or not a safetensors container): {err}") from err
    if meta.get("format") != FORMAT:
        raise CmxError(f"{path}: not a codexmini .cmx file (format {meta.get('format')!r}); export one with "
                       "`codexmini export`")
    version_text = meta.get("version", "")
    if not (isinstance(version_text, str) and version_text.isascii() and version_text.isdigit()):
        raise CmxError(f"{path}: bad format version {version_text!r}")
    version = int(version_text)
    if version > VERSION:
        raise CmxError(f"{path}: written in .cmx format version {version}, but this codexmini reads up to version "
                       f"{VERSION}; upgrade codexmini to load it")
    if version < 1:
        raise CmxError(f"{path}: bad format version {version}")
    for key in ("config", "schemes", "tokenizer", "checksum"):
        if key not in meta:
            raise CmxError(f"{path}: metadata key {key!r} is missing")
    try:
        config, schemes = _json(meta["config"], "config"), _json(meta["schemes"], "schemes")
        check_metadata(config, schemes, meta["tokenizer"])
        check_contents(config, schemes, tensors, version)
    except CmxError as err:
        raise CmxError(f"{path}: {err}") from None
    if verify_checksum:
        signed = meta if version >= 2 else None
        got = payload_checksum(tensors, signed) if ranges is None else _file_checksum(path, tensors, ranges, signed)
        if got != meta["checksum"]:
            raise CmxError(f"{path}: checksum mismatch: the file was modified or corrupted after export (its "
                           "weights or its metadata); export it again")
    return CmxFile(path, version, config, schemes, meta["tokenizer"], meta.get("chat_template", ""), tensors,
                   meta["checksum"], ranges, mapping)


def _json(text: str, key: str):
    def no_constants(name):  # NaN / Infinity are not JSON; Python's parser would take them
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as err:
        raise CmxError(f"metadata {key!r} is not valid JSON: {err}") from None


def _int(config: dict, key: str, low: int = 1, optional: bool = False):
    value = config.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CmxError(f"config {key} = {value!r} must be an integer >= {low}")
    return value


def _positive(config: dict, key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CmxError(f"config {key} = {value!r} must be a finite number > 0")
    return value


def check_metadata(config, schemes, tokenizer_json) -> None:
    """Every config value the runtime uses, the schemes' form and the tokenizer's JSON; raises `CmxError` naming
    the key. (Shapes against the tensors: `check_contents`.)"""
    check_config(config, schemes)
    check_tokenizer_json(tokenizer_json)


def check_config(config, schemes) -> None:
    """The config's values (types, ranges, known names, per-layer lists) and the schemes' form."""
    if not isinstance(config, dict):
        raise CmxError(f"metadata 'config' must be a JSON object, got {type(config).__name__}")
    if not isinstance(schemes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in schemes.items()):
        raise CmxError("metadata 'schemes' must be a JSON object of {layer name: scheme name} strings")
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "layer_types", "layer_num_attention_heads",
            "layer_num_key_value_heads", "layer_intermediate_sizes", "rms_norm_eps", "rope_theta", "feature_map")
    missing = [k for k in need if k not in config]
    if missing:
        raise CmxError(f"config lacks {missing}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        _int(config, key)
    head_dim = _int(config, "head_dim", low=2)
    if head_dim % 2:
        raise CmxError(f"config head_dim = {head_dim} must be even (RoPE rotates pairs)")
    _positive(config, "rope_theta")
    _positive(config, "rms_norm_eps")
    for key in ("sliding_window", "linear_chunk_size", "feature_dim", "embedding_rank", "max_position_embeddings"):
        _int(config, key, optional=True)
    if config.get("embedding_rank") is not None and config["embedding_rank"] >= config["hidden_size"]:
        raise CmxError(f"config embedding_rank = {config['embedding_rank']} must be below hidden_size "
                       f"{config['hidden_size']}")
    for key in ("tie_word_embeddings", "linear_decay"):
        if key in config and not isinstance(config[key], bool):
            raise CmxError(f"config {key} = {config[key]!r} must be true or false")
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        ids = config.get(key)
        ids = ids if isinstance(ids, list) and key == "eos_token_id" else [ids] if ids is not None else []
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in ids):
            raise CmxError(f"config {key} = {config.get(key)!r} must be a token id"
                           f"{', a list of them' if key == 'eos_token_id' else ''} or null")
    n = config["num_hidden_layers"]
    for key in ("layer_types", "layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"):
        if not isinstance(config[key], list) or len(config[key]) != n:
            got = f"{len(config[key])} entries" if isinstance(config[key], list) else repr(config[key])
            raise CmxError(f"config {key} must be a list with one entry per layer: num_hidden_layers is {n}, "
                           f"it has {got}")
    for i, t in enumerate(config["layer_types"]):
        if t not in LAYER_TYPES:
            raise CmxError(f"config layer_types[{i}] = {t!r} is not one of {', '.join(LAYER_TYPES)}")
    if config["feature_map"] not in FEATURE_MAPS:
        raise CmxError(f"config feature_map = {config['feature_map']!r} is not one of {', '.join(FEATURE_MAPS)}")
    for key in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"):
        for i, v in enumerate(config[key]):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CmxError(f"config {key}[{i}] = {v!r} must be an integer >= 1")
    for i, (h, kv) in enumerate(zip(config["layer_num_attention_heads"], config["layer_num_key_value_heads"])):
        if h % kv:
            raise CmxError(f"config layer_num_key_value_heads[{i}] = {kv} must divide "
                           f"layer_num_attention_heads[{i}] = {h}")
    if "hybrid" in config["layer_types"] and config.get("sliding_window") is None:
        raise CmxError("config sliding_window is missing (the hybrid layers' window)")


def check_tokenizer_json(tokenizer_json) -> None:
    """The tokenizer metadata parses as a tokenizer.json: a JSON object with a `model` object holding its vocab.
    (The runtime builds the tokenizer from it with the `tokenizers` library, which this module does not import.)"""
    if not isinstance(tokenizer_json, str):
        raise CmxError("metadata 'tokenizer' must be a string (tokenizer.json)")
    tok = _json(tokenizer_json, "tokenizer")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("type", "BPE"), str) or \
            not isinstance(model.get("vocab", {}), (dict, list)) or \
            not isinstance(tok.get("added_tokens", []), list):
        raise CmxError("metadata 'tokenizer' is not a tokenizer.json (it needs a 'model' object with its vocab)")


def _linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    d, hd = config["hidden_size"], config["head_dim"]
    shapes = {}
    for i in range(config["num_hidden_layers"]):
        h, kv = config["layer_num_attention_heads"][i], config["layer_num_key_value_heads"][i]
        f = config["layer_intermediate_sizes"][i]
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj": (h * hd, d), p + "self_attn.k_proj": (kv * hd, d),
                       p + "self_attn.v_proj": (kv * hd, d), p + "self_attn.o_proj": (d, h * hd),
                       p + "mlp.gate_proj": (f, d), p + "mlp.up_proj": (f, d), p + "mlp.down_proj": (d, f)})
    if not config.get("tie_word_embeddings"):  # a tied head is the embedding, stored once
        shapes["lm_head"] = (config["vocab_size"], d)
    return shapes


def _quant_shapes(name: str, scheme: str, out: int, inp: int, version: int) -> dict[str, tuple[int, ...]]:
    s = Scheme(scheme)
    if s.bits == 8:
        return {name + ".qweight": (out, inp), name + ".scale": (out,)}
    shapes = {name + ".qweight": (out, s.packed_cols(inp)), name + ".scale": (out, inp // s.group_size)}
    if s.stores_zero or version < 3:  # before version 3 symmetric int4 stored its (constant) zero too
        shapes[name + ".zero"] = (out, inp // s.group_size)
    if s.stores_min:
        shapes[name + ".min"] = (out, inp // s.group_size)
    return shapes


def expected_shapes(config: dict, schemes: dict[str, str], version: int = VERSION) -> dict[str, tuple[int, ...]]:
    """Every tensor the file must hold, with its shape, from the config, the schemes and the format version."""
    d, v, hd = config["hidden_size"], config["vocab_size"], config["head_dim"]
    out: dict[str, tuple[int, ...]] = {}
    rank = config.get("embedding_rank")
    if rank:
        out["model.embed_tokens.embed.weight"] = (v, rank)
        out["model.embed_tokens.proj.weight"] = (d, rank)
    elif EMBED in schemes:
        out.update(_quant_shapes(EMBED, schemes[EMBED], v, d, version))
    else:
        out[EMBED + ".weight"] = (v, d)
    out["model.norm.weight"] = (d,)
    fdim = config.get("feature_dim") or hd
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        if config["layer_types"][i] != "softmax":
            h, kv = config["layer_num_attention_heads"][i], config["layer_num_key_value_heads"][i]
            if config["feature_map"] == "hedgehog":
                out[p + "self_attn.feature_map_q.weight"] = (h, hd, fdim)
                out[p + "self_attn.feature_map_k.weight"] = (kv, hd, fdim)
            if config.get("linear_decay"):
                out[p + "self_attn.decay_logit"] = (h,)
    for name, (o, i) in _linear_shapes(config).items():
        scheme = schemes.get(name)
        if scheme is None:
            out[name + ".weight"] = (o, i)
        else:
            out.update(_quant_shapes(name, scheme, o, i, version))
    return out


def check_contents(config: dict, schemes: dict, tensors: dict[str, torch.Tensor], version: int = VERSION) -> None:
    """Config fields, scheme names and every tensor's presence and shape; raises `CmxError`."""
    check_config(config, schemes)
    linears = _linear_shapes(config)
    for name, scheme in schemes.items():
        try:
            s = Scheme(str(scheme))
        except ValueError:
            s = None
        if s is None or s.bits not in (2, 3, 4, 8) or (version < 3 and (s.bits in (2, 3) or s.stores_min)):
            raise CmxError(f"unknown quantization scheme {scheme!r} for {name} (known: int8, "
                           f"{'int<b>_g<group>[_asym|_min] for b = 4, 3, 2' if version >= 3 else 'int4_g<group>[_asym]'})")
        if name == EMBED and not config.get("embedding_rank"):
            if version < 3 and (scheme != "int8" or config.get("tie_word_embeddings")):
                raise CmxError(f"a version {version} file holds only an untied int8 embedding table")
            width = config["hidden_size"]
        elif name in linears:
            width = linears[name][1]
        else:
            raise CmxError(f"scheme given for {name!r}, which is not a linear layer (or the embedding table) of "
                           "this config")
        if s.group_size is not None:
            try:
                check_group_size(width, s.group_size, name, s.bits)
            except ValueError as err:
                raise CmxError(str(err)) from None
    want = expected_shapes(config, schemes, version)
    absent = sorted(set(want) - set(tensors))
    if absent:
        raise CmxError(f"tensors missing: {absent[:5]}{' ...' if len(absent) > 5 else ''}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CmxError(f"unexpected tensors: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CmxError(f"tensor {name} has shape {tuple(tensors[name].shape)}, the config implies {tuple(shape)}")
        t = tensors[name]
        if name.endswith((".qweight", ".zero")):
            owner = name.rsplit(".", 1)[0]
            want_dtype = torch.int8 if schemes.get(owner) == "int8" and name.endswith(".qweight") else torch.uint8
            if t.dtype != want_dtype:
                raise CmxError(f"tensor {name} has dtype {t.dtype}, expected {want_dtype} codes")
        elif t.dtype not in FLOAT_DTYPES:
            raise CmxError(f"tensor {name} has dtype {t.dtype}, expected float32, float16 or bfloat16")
