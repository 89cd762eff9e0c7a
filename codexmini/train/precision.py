"""Which precision a run trains in, and keeping accelerate's process-wide state in step with it."""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_precision(setting: str) -> str:
    """'auto' -> bf16 on a CUDA device with bf16 or a CPU with AVX-512 bf16 (measured faster, see README);
    otherwise fp32 ('no'). Any other setting is returned as is."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def reset_accelerate_precision(precision: str) -> None:
    """accelerate keeps one process-wide state; a second stage (or notebook cell) asking for another precision
    would be refused. In a single process it is safe to forget the old choice; under a launcher it is not."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        if AcceleratorState().mixed_precision != precision:
            AcceleratorState._reset_state()
