"""The one bitsandbytes vocabulary: `int8` (LLM.int8), `nf4` and `fp4`, and the `BitsAndBytesConfig` for each.

The teacher loader (`load_teacher(..., quantization=...)`, the `teacher.quantization` config key) and the
quantize stage's bitsandbytes path (`codexmini.quantize.bnb`) both take these names. It lives with the models
because the teacher loader is here and models never import a stage.
"""

from __future__ import annotations

import torch

BNB_MODES = ("int8", "nf4", "fp4")

# The teacher loader's old names. They are refused with the new spelling rather than kept as aliases: an alias
# keeps the second vocabulary alive in every config that uses it, and the fix is one word.
_RENAMED = {"8bit": "int8", "4bit": "nf4"}


def check_bnb_mode(mode: str) -> None:
    """Raise a ValueError naming the choices (and the new spelling of an old name) unless `mode` is one of
    `BNB_MODES`."""
    if mode in _RENAMED:
        raise ValueError(f"bitsandbytes mode {mode!r} is now spelled {_RENAMED[mode]!r} "
                         f"(the modes are {', '.join(BNB_MODES)})")
    if mode not in BNB_MODES:
        raise ValueError(f"bitsandbytes mode {mode!r} is not one of {', '.join(BNB_MODES)}")


def bnb_config(mode: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' `BitsAndBytesConfig` for `mode`: `int8` (LLM.int8), `nf4` or `fp4` (4-bit, computing in
    `compute_dtype`), or a clear error where bitsandbytes cannot run."""
    check_bnb_mode(mode)
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, RuntimeError) as err:  # bitsandbytes raises RuntimeError on platforms it does not support
        raise RuntimeError(f"bitsandbytes {mode} needs a working bitsandbytes on this platform "
                           f"(pip install bitsandbytes): {err}") from err
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute_dtype)
