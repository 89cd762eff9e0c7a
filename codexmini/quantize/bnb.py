"""bitsandbytes: load or convert a model to LLM.int8 / NF4 / FP4 through transformers' `BitsAndBytesConfig`, for
memory-light evaluation and for training adapters on top (QLoRA-style)."""

from __future__ import annotations

import torch

BNB_MODES = ("int8", "nf4", "fp4")


def bnb_config(mode: str, compute_dtype: torch.dtype = torch.float32):
    """A `BitsAndBytesConfig` for `mode` (int8 | nf4 | fp4); a clear error where bitsandbytes cannot run."""
    from transformers import BitsAndBytesConfig

    if mode not in BNB_MODES:
        raise ValueError(f"bitsandbytes mode {mode!r} is not one of {BNB_MODES}")
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, RuntimeError) as err:
        raise RuntimeError(f"bitsandbytes {mode} needs a working bitsandbytes on this platform "
                           f"(pip install bitsandbytes): {err}") from err
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute_dtype)


def load_bnb(folder, mode: str = "nf4", compute_dtype: torch.dtype = torch.float32):
    """`from_pretrained(folder)` with its linear layers in bitsandbytes `mode` (the head stays in float)."""
    from transformers import AutoModelForCausalLM

    from ..models import CodexMiniConfig  # noqa: F401  (registers the codexmini model type with the Auto classes)

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(mode, compute_dtype),
                                                dtype=compute_dtype)
