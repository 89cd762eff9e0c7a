"""The `.cmx` on-device checkpoint: one self-describing file, a safetensors container.

Tensors are the model's weights, named as in the PyTorch model: float weights as `<name>` (fp32 or fp16) and
quantized linear layers as `<name>.qweight` / `.scale` / `.zero` in the portable layout of
`codexmini.ops.layouts` (int8 per output channel; int4 two codes per byte, low nibble first, per-group scale and
zero point). The safetensors metadata (all strings) holds:

    format        "codexmini-cmx"
    version       format version (an integer); readers refuse versions newer than they know
    config        the model config as JSON (per-layer sizes and layer types)
    schemes       JSON {linear name: "int8" | "int4_g<group>[_asym]"} for the quantized layers
    tokenizer     tokenizer.json text;  chat_template  the chat template (may be empty)
    checksum      sha256 over every tensor's name, dtype, shape and bytes, in name order

This module imports only torch, safetensors, the standard library and `codexmini.ops` (the scheme and layer
names): the runtime reads through it alone.
Reading validates everything (container, format, version, checksum, config, scheme names, every tensor's shape
against the config) and raises one `CmxError` with a clear message; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_path
from .ops.layouts import Scheme, check_group_size
from .ops.names import FEATURE_MAPS, LAYER_TYPES

FORMAT = "codexmini-cmx"
VERSION = 1
EMBED = "model.embed_tokens"  # the one non-linear tensor that may be quantized (int8 rows)


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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _mapped_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
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
    return tensors, ranges


def _checksum_label(name: str, t: torch.Tensor) -> bytes:
    """What the checksum hashes before a tensor's bytes (its name, dtype and shape)."""
    return f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()


def _file_checksum(path: Path, tensors: dict[str, torch.Tensor], ranges: dict[str, tuple[int, int]]) -> str:
    """`payload_checksum` computed with plain reads of the file: the same digest, without making the mapped
    tensors' pages resident in this process."""
    h = hashlib.sha256()
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


def payload_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
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
    check_contents(config, schemes, tensors)
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config, sort_keys=True),
            "schemes": json.dumps(schemes, sort_keys=True), "tokenizer": tokenizer_json,
            "chat_template": chat_template or "", "checksum": payload_checksum(tensors)}
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
    ranges = None
    try:
        with safe_open(str(path), framework="pt") as f:  # the library validates the container
            meta = f.metadata() or {}
            if mmap:
                tensors, ranges = _mapped_tensors(path)
            else:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CmxError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad containers
        raise CmxError(f"{path}: not a readable .cmx file (truncated or not a safetensors container): {err}") from err
    if meta.get("format") != FORMAT:
        raise CmxError(f"{path}: not a codexmini .cmx file (format {meta.get('format')!r}); export one with "
                       "`codexmini export`")
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise CmxError(f"{path}: bad format version {meta.get('version')!r}") from None
    if version > VERSION:
        raise CmxError(f"{path}: written in .cmx format version {version}, but this codexmini reads up to version "
                       f"{VERSION}; upgrade codexmini to load it")
    if version < 1:
        raise CmxError(f"{path}: bad format version {version}")
    for key in ("config", "schemes", "tokenizer", "checksum"):
        if key not in meta:
            raise CmxError(f"{path}: metadata key {key!r} is missing")
    try:
        config, schemes = json.loads(meta["config"]), json.loads(meta["schemes"])
    except json.JSONDecodeError as err:
        raise CmxError(f"{path}: config or schemes metadata is not valid JSON: {err}") from err
    if verify_checksum and (payload_checksum(tensors) if ranges is None else _file_checksum(path, tensors, ranges)) \
            != meta["checksum"]:
        raise CmxError(f"{path}: checksum mismatch: the weights were modified or corrupted after export")
    try:
        check_contents(config, schemes, tensors)
    except CmxError as err:
        raise CmxError(f"{path}: {err}") from None
    return CmxFile(path, version, config, schemes, meta["tokenizer"], meta.get("chat_template", ""), tensors,
                   meta["checksum"], ranges)


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


def expected_shapes(config: dict, schemes: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Every tensor the file must hold, with its shape, from the config and the schemes."""
    d, v, hd = config["hidden_size"], config["vocab_size"], config["head_dim"]
    out: dict[str, tuple[int, ...]] = {}
    rank = config.get("embedding_rank")
    if rank:
        out["model.embed_tokens.embed.weight"] = (v, rank)
        out["model.embed_tokens.proj.weight"] = (d, rank)
    elif schemes.get(EMBED) == "int8":
        out[EMBED + ".qweight"], out[EMBED + ".scale"] = (v, d), (v,)
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
        elif scheme == "int8":
            out.update({name + ".qweight": (o, i), name + ".scale": (o,)})
        else:
            g = Scheme(scheme).group_size
            out.update({name + ".qweight": (o, i // 2), name + ".scale": (o, i // g), name + ".zero": (o, i // g)})
    return out


def check_contents(config: dict, schemes: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Config fields, scheme names and every tensor's presence and shape; raises `CmxError`."""
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "layer_types", "layer_num_attention_heads",
            "layer_num_key_value_heads", "layer_intermediate_sizes", "rms_norm_eps", "rope_theta", "feature_map")
    missing = [k for k in need if k not in config]
    if missing:
        raise CmxError(f"config lacks {missing}")
    n = config["num_hidden_layers"]
    for key in ("layer_types", "layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"):
        if len(config[key]) != n:
            raise CmxError(f"config {key} has {len(config[key])} entries for {n} layers")
    bad = [t for t in config["layer_types"] if t not in LAYER_TYPES]
    if bad or config["feature_map"] not in FEATURE_MAPS:
        raise CmxError(f"config has unknown layer types {bad} or feature map {config['feature_map']!r}")
    linears = _linear_shapes(config)
    for name, scheme in schemes.items():
        try:
            s = Scheme(str(scheme))
        except ValueError:
            s = None
        if s is None or s.bits not in (4, 8):  # a float layer has no entry in the file's schemes ("none" is not one)
            raise CmxError(f"unknown quantization scheme {scheme!r} for {name} (known: int8, int4_g<group>[_asym])")
        if name == EMBED and scheme == "int8" and not config.get("embedding_rank"):
            if config.get("tie_word_embeddings"):
                raise CmxError("an int8 embedding table cannot also be the tied output head; untie it")
            continue
        if name not in linears:
            raise CmxError(f"scheme given for {name!r}, which is not a linear layer (or an int8 embedding table) "
                           "of this config")
        if s.bits == 4:
            try:
                check_group_size(linears[name][1], s.group_size, name)
            except ValueError as err:
                raise CmxError(str(err)) from None
    want = expected_shapes(config, schemes)
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
        if name.endswith(".qweight") and t.dtype not in (torch.int8, torch.uint8):
            raise CmxError(f"tensor {name} has dtype {t.dtype}, expected int8/uint8 codes")
        if not name.endswith((".qweight", ".zero")) and not t.is_floating_point():
            raise CmxError(f"tensor {name} has dtype {t.dtype}, expected a float")
