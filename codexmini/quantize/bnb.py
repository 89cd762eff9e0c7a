"""bitsandbytes: load a saved model with its linear layers in LLM.int8 / NF4 / FP4, for memory-light evaluation
and for training adapters on top (QLoRA-style). The mode names and the `BitsAndBytesConfig` builder are the
models package's (`codexmini.models.bnb`), shared with the teacher loader."""

from __future__ import annotations

import torch

from ..models.bnb import BNB_MODES, bnb_config

__all__ = ["BNB_MODES", "bnb_config", "load_bnb"]


def load_bnb(folder, mode: str = "nf4", compute_dtype: torch.dtype = torch.float32):
    """`from_pretrained(folder)` with its linear layers in bitsandbytes `mode` (int8 | nf4 | fp4; the head stays in
    float)."""
    from transformers import AutoModelForCausalLM  # codexmini's model type is registered: this module imported models

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(mode, compute_dtype),
                                                dtype=compute_dtype)
