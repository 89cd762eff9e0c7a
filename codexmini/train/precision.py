"""Which precision a run trains in, and keeping accelerate's process-wide state in step with it."""

from __future__ import annotations

import torch

from ..ops.cpu import bf16_matmul_pays


def resolve_precision(setting: str) -> str:
    """'auto' -> bf16 on a CUDA device with bf16, or on a CPU whose bf16 matmul is measurably faster than its fp32 one
    at a training step's shape (`ops.cpu.bf16_matmul_pays`: AVX-512 BF16 or AMX is not enough, see there);
    otherwise fp32 ('no'). Any other setting is returned as is."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if bf16_matmul_pays(1024, 576, 1536) else "no"


def reset_accelerate_precision(precision: str) -> None:
    """accelerate keeps one process-wide state; a second stage (or notebook cell) asking for another precision
    would be refused. In a single process it is safe to forget the old choice; under a launcher it is not."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        if AcceleratorState().mixed_precision != precision:
            AcceleratorState._reset_state()
