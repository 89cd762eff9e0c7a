"""Export a CodexMini model (float or quantized) and its tokenizer to a single `.cmx` file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.quantized import QuantEmbedding, QuantLinear
from ..cmx import write_cmx

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def model_tensors(model, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The tensors a .cmx file holds: float weights in `dtype`, quantized layers as their packed buffers."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"export.dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
    quant = {name for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    out = {}
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if owner in quant:
            # Codes and zero points as they are; scales in fp16 (the quantizers made their values fp16-exact).
            out[name] = t if not t.is_floating_point() else t.half()
        else:
            out[name] = t.to(FLOAT_DTYPES[dtype]) if t.is_floating_point() else t
    return out


def export_cmx(model, tokenizer, path: str | Path, dtype: str = "float32") -> Path:
    """Write `model` (a CodexMiniForCausalLM, float or quantized) and `tokenizer` (a fast HF tokenizer) to `path`."""
    config = model.config.to_dict()
    # What only transformers needs (class names, remote-code map) stays out of the device file.
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype", "quantization_scheme", "auto_map"):
        config.pop(k, None)
    schemes = dict(model.config.quantization_scheme or {})
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("export needs a fast tokenizer (tokenizers-backed) so the file carries tokenizer.json")
    return write_cmx(path, model_tensors(model, dtype), config, schemes, backend.to_str(),
                     getattr(tokenizer, "chat_template", None) or "")


@dataclass
class ExportConfig:
    """What the export stage writes and how it checks the result with the runtime."""

    dtype: str = "float32"  # float weights in the file: float32 | float16 (quantized layers keep their codes)
    kernels: str = "auto"  # runtime kernels for the check and the speed numbers: auto | cmx | native | dequant
    gguf: bool = False  # also write model.gguf when the model is llama-shaped (all softmax, float, uniform)
    check_tokens: int = 64  # tokens of a validation block compared between runtime and PyTorch
    bench_context: int = 256  # prompt length for the runtime's prefill / decode speed
    bench_decode_tokens: int = 32
    # The runtime's fp32 NLL on the check block must be within this of PyTorch's, else the file is refused.
    check_nll_tolerance: float = 0.05


def check_export_config(cfg: ExportConfig) -> None:
    """Refuse bad export settings before a recipe's long stages run."""
    if cfg.dtype not in FLOAT_DTYPES:
        raise ValueError(f"export.dtype {cfg.dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
    from ..runtime.kernels import KERNEL_MODES

    if cfg.kernels not in KERNEL_MODES:
        raise ValueError(f"export.kernels {cfg.kernels!r} is not one of {', '.join(KERNEL_MODES)}")
    if not 0 < cfg.check_nll_tolerance < float("inf"):
        raise ValueError(f"export.check_nll_tolerance must be a positive number, got {cfg.check_nll_tolerance}")
    if cfg.check_tokens < 2:
        raise ValueError(f"export.check_tokens must be >= 2 (a next-token loss needs two), got {cfg.check_tokens}")
    for name in ("bench_context", "bench_decode_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"export.{name} must be >= 1, got {getattr(cfg, name)}")
