"""One-row matmul (decoding) kernels side by side: fp32 `F.linear` (the baseline), torch's packed int8 / int4 CPU
kernels (bf16 activations, their fast path) and codexmini's own kernels (fp32 or int8 activations), on the weight
shapes of a SmolLM2-135M layer and a 2048x2048 matrix. Median of `--repeats` calls, speed-up against fp32.

    .venv/bin/python scripts/bench_kernels.py          # about a minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_us(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    from codexmini.runtime import native
    from codexmini.ops.layouts import unpack_int4
    from codexmini.runtime.kernels import dequantize

    ext = native.load()
    g = torch.Generator().manual_seed(0)
    shapes = [(960, 576, "q/k/v fused"), (3072, 576, "gate/up fused"), (576, 1536, "down"),
              (2048, 2048, "square"), (49152, 576, "head (vocab)")]
    print(f"# one-row matmul, median of {args.repeats} calls, threads={torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, codexmini kernels: "
          f"{ext.isa() if ext else 'not built: ' + str(native.load_error())}\n")
    cols = ["fp32 F.linear", "torch int8 (bf16 act)", "torch int4 g32 (bf16 act)"]
    if ext:
        cols += ["cmx int8 (fp32 act)", "cmx int8 (int8 act)", "cmx int4 g32 (fp32 act)", "cmx int4 g32 (int8 act)"]
    print("| shape | " + " | ".join(f"{c} µs" for c in cols) + " | best vs fp32 |")
    print("|---|" + "---|" * (len(cols) + 1))
    for N, K, name in shapes:
        x = torch.randn(1, K, generator=g)
        xb = x.bfloat16()
        t4 = {"w.qweight": torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
              "w.scale": torch.rand(N, K // 32, generator=g) * 0.01,
              "w.zero": torch.randint(0, 16, (N, K // 32), dtype=torch.uint8, generator=g)}
        w = dequantize(t4, "w", "int4")
        q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s8 = torch.rand(N, generator=g) * 0.01
        codes = unpack_int4(t4["w.qweight"]).reshape(N, K).to(torch.int32)
        w4 = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([t4["w.scale"].t(), (8 - t4["w.zero"].float()).t() * t4["w.scale"].t()], -1).bfloat16()
        fns = [lambda: F.linear(x, w), lambda: torch._weight_int8pack_mm(xb, q8, s8.bfloat16()),
               lambda: torch._weight_int4pack_mm_for_cpu(xb, w4, 32, sz.contiguous())]
        if ext:
            fns += [lambda: ext.q8_linear(x, q8, s8, None, False), lambda: ext.q8_linear(x, q8, s8, None, True),
                    lambda: ext.q4_linear(x, t4["w.qweight"], t4["w.scale"], t4["w.zero"], None, False),
                    lambda: ext.q4_linear(x, t4["w.qweight"], t4["w.scale"], t4["w.zero"], None, True)]
        us = [median_us(f, args.repeats) for f in fns]
        print(f"| {N}x{K} {name} | " + " | ".join(f"{u:.1f}" for u in us) + f" | {us[0] / min(us[1:]):.1f}x |")


if __name__ == "__main__":
    main()
