"""What this CPU computes fast: whether torch's bf16 matmul beats its fp32 one here, measured once per shape.

A CPU that multiplies bf16 natively is not enough: on a Xeon with AVX-512 BF16 but no AMX torch's bf16 matmul ran at
0.4-0.75x its fp32 rate (60-1024 rows x 576 x 256-3072), on an AMD EPYC with AVX-512 BF16 it trained 1.7x faster and
prefilled 1.3-1.6x faster. So the runtime's prompts (`codexmini.runtime.native`) and training's `auto` precision
(`codexmini.train.precision`) ask this instead of reading CPU flags alone.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs that multiply bf16 natively
ENV = "CODEXMINI_CPU_BF16"  # "0" / "1": decide instead of measuring (where the CPU multiplies bf16 natively)


def cpu_has_bf16() -> bool:
    """Whether /proc/cpuinfo lists a native bf16 multiply (x86); False where it cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in BF16_FLAGS)


@functools.cache
def bf16_matmul_pays(rows: int, inner: int, cols: int, native: bool | None = None) -> bool:
    """Whether `[rows, inner] @ [inner, cols]` runs in bf16 in under 0.85x its fp32 time on this CPU (median of 5
    timings of a few products each, with torch's current threads: milliseconds). `native`: whether the CPU (or a
    kernel build) multiplies bf16 natively (default: `cpu_has_bf16()`); without it bf16 is emulated and never pays.
    `CODEXMINI_CPU_BF16=0|1` answers instead of measuring where `native` holds."""
    if not (cpu_has_bf16() if native is None else native):
        return False
    forced = os.environ.get(ENV, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"{ENV}={forced!r}: set it to 0 (fp32) or 1 (bf16), or unset it to measure")
    if forced:
        return forced == "1"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, inner, generator=g), torch.randn(inner, cols, generator=g)
    repeats = max(1, int(2e8 // (2 * rows * inner * cols)))  # ~0.2 GFLOP per timing

    def median_s(x, y) -> float:
        x @ y
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                x @ y
            times.append(time.perf_counter() - t0)
        return sorted(times)[2]

    return median_s(a.bfloat16(), b.bfloat16()) < 0.85 * median_s(a, b)
