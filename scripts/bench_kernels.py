"""One-row matmul (decoding) kernels side by side, median of `--repeats` calls.

Table 1: fp32 `F.linear` (the baseline), torch's packed int8 / int4 CPU kernels (bf16 activations, their fast path)
and codexmini's own kernels (fp32 or int8 activations), on the weight shapes of a SmolLM2-135M layer and a 2048x2048
matrix; speed-up against fp32.

Table 2: codexmini's group-quantized kernels (q4_linear / q3_linear / q2_linear) at SmolLM2-135M's shapes (q/o 576x576,
gate/up 1536x576, down 576x1536, the vocabulary head 49152x576), group 32: int4 as older files store it (fp32 scales,
a zero tensor) and the portable layout's int4 / int3 / int2 (fp16 scales, symmetric: no zero tensor); microseconds
per call and GB/s of weight bytes read (codes, scales and zero points).

    .venv/bin/python scripts/bench_kernels.py                  # about a minute
    .venv/bin/python scripts/bench_kernels.py --table lowbit   # table 2 only

Table 3 (`--table rows`): a batched decode step, one weight against 1 .. `gemv_rows()` rows of int8 activations:
int4 in the file's layout and repacked in panels (what the runtime runs where the CPU has AVX-512 VNNI), and int8.

Table 4 (`--table stack`): every linear layer of a 30-layer stack of SmolLM2-135M's shapes in turn (q, k, v, o,
gate, up, down: 106 M weights, so they stream from memory as in a decoding step), int4 / int3 / int2 g32 with int8
activations, in the file's layout and in panels; ms per pass over the stack (median of 7, the kernels in turn) and
GB/s of weight bytes. `--stack big` runs twelve 8192x2048 matrices instead (113 MB in int4): calls long enough that
what every call costs whatever its size (the binding, the activations' quantization, the threads' start, the first
cache lines of the weights) no longer counts, so the bytes per second are the kernels' own.

    .venv/bin/python scripts/bench_kernels.py --table stack [--stack big]
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

SMOLLM2 = [(576, 576, "q/o"), (1536, 576, "gate/up"), (576, 1536, "down"), (49152, 576, "head (vocab)")]


def median_us(fn, repeats: int, budget_s: float = 2.0) -> float:
    """Median of `repeats` timed calls (fewer when a call is slow: about `budget_s` seconds in all)."""
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    n = max(5, min(repeats, int(budget_s / max(one, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def one_row_table(ext, repeats: int) -> None:
    from codexmini.ops.layouts import dequantize, unpack_int4

    g = torch.Generator().manual_seed(0)
    shapes = [(960, 576, "q/k/v fused"), (3072, 576, "gate/up fused"), (576, 1536, "down"),
              (2048, 2048, "square"), (49152, 576, "head (vocab)")]
    cols = ["fp32 F.linear", "torch int8 (bf16 act)", "torch int4 g32 (bf16 act)"]
    if ext:
        cols += ["cmx int8 (fp32 act)", "cmx int8 (int8 act)", "cmx int4 g32 (fp32 act)", "cmx int4 g32 (int8 act)"]
    print("| shape | " + " | ".join(f"{c} µs" for c in cols) + " | best vs fp32 |")
    print("|---|" + "---|" * (len(cols) + 1))
    for N, K, name in shapes:
        x = torch.randn(1, K, generator=g)
        xb = x.bfloat16()
        q4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
        s4 = torch.rand(N, K // 32, generator=g) * 0.01
        z4 = torch.randint(0, 16, (N, K // 32), dtype=torch.uint8, generator=g)
        w = dequantize("int4_g32_asym", q4, s4, z4)
        q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s8 = torch.rand(N, generator=g) * 0.01
        codes = unpack_int4(q4).reshape(N, K).to(torch.int32)
        w4 = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([s4.t(), (8 - z4.float()).t() * s4.t()], -1).bfloat16().contiguous()
        fns = [lambda: F.linear(x, w), lambda: torch._weight_int8pack_mm(xb, q8, s8.bfloat16()),
               lambda: torch._weight_int4pack_mm_for_cpu(xb, w4, 32, sz)]
        if ext:
            fns += [lambda: ext.q8_linear(x, q8, s8, None, False), lambda: ext.q8_linear(x, q8, s8, None, True),
                    lambda: ext.q4_linear(x, q4, s4, z4, None, False), lambda: ext.q4_linear(x, q4, s4, z4, None, True)]
        us = [median_us(f, repeats) for f in fns]
        print(f"| {N}x{K} {name} | " + " | ".join(f"{u:.1f}" for u in us) + f" | {us[0] / min(us[1:]):.1f}x |")


def low_bit_table(ext, repeats: int) -> None:
    from codexmini.ops.layouts import pack_bits

    g = torch.Generator().manual_seed(1)
    empty = torch.empty(0, dtype=torch.uint8)
    print("| shape | kernel | weight KiB | fp32 act µs | GB/s | int8 act µs | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for N, K, name in SMOLLM2:
        x = torch.randn(1, K, generator=g)
        scale = torch.randn(N, K // 32, generator=g) * 0.01
        layers = [("int4 g32, fp32 scales + zero", 4, scale, torch.randint(0, 16, scale.shape, dtype=torch.uint8,
                                                                          generator=g))]
        layers += [(f"int{b} g32, fp16 scales, sym", b, scale.half(), empty) for b in (4, 3, 2)]
        for label, bits, s, z in layers:
            q = pack_bits(torch.randint(0, 1 << bits, (N, K), generator=g), bits)
            nbytes = q.numel() + s.numel() * s.element_size() + z.numel()
            linear = getattr(ext, f"q{bits}_linear")
            us = [median_us(lambda: linear(x, q, s, z, None, act), repeats) for act in (False, True)]
            print(f"| {N}x{K} {name} | {label} | {nbytes / 1024:.0f} | {us[0]:.1f} | {nbytes / us[0] / 1e3:.1f} | "
                  f"{us[1]:.1f} | {nbytes / us[1] / 1e3:.1f} |")


def rows_table(ext, repeats: int) -> None:
    """A batched decode step: the same weight against 1 .. gemv_rows() rows (one per sequence), int8 activations;
    µs per call and per row, and the batch's cost against one row's."""
    from codexmini.ops.layouts import pack_bits

    g = torch.Generator().manual_seed(2)
    empty = torch.empty(0, dtype=torch.uint8)
    rows = sorted({1, 2, 4, 8, ext.gemv_rows()})
    print("| shape | kernel | " + " | ".join(f"{m} rows µs (x one)" for m in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for N, K, name in [(3072, 576, "gate/up fused"), (576, 1536, "down"), (49152, 576, "head (vocab)")]:
        q4 = pack_bits(torch.randint(0, 16, (N, K), generator=g), 4)
        s4 = (torch.randn(N, K // 32, generator=g) * 0.01).half()
        q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s8 = (torch.rand(N, generator=g) * 0.01).half()
        kernels = [("int4 g32", lambda x: ext.q4_linear(x, q4, s4, empty, None, True))]
        if ext.panels():  # the same weight repacked as the runtime does for the panel kernel
            from codexmini.runtime.kernels import to_panels

            p4, ps4 = to_panels(q4, ext.panels(), 4), to_panels(s4, ext.panels())
            kernels.append(("int4 g32 panels", lambda x: ext.q4p_linear(x, p4, ps4, empty, None)))
        kernels.append(("int8", lambda x: ext.q8_linear(x, q8, s8, None, True)))
        for label, call in kernels:
            xs = {m: torch.randn(m, K, generator=g) for m in rows}
            us = [median_us(lambda: call(xs[m]), repeats) for m in rows]
            print(f"| {N}x{K} {name} | {label} | " + " | ".join(f"{u:.1f} ({u / us[0]:.2f}x)" for u in us) + " |")


STACKS = {"smollm2": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30,
          "big": [(8192, 2048)] * 12}


def stack_table(ext, rows=(1, 8), passes: int = 7, stack: str = "smollm2") -> None:
    """A decoding step's matrices in turn, too many to stay in cache: the kernels per byte of weights read. The
    passes visit every kernel in turn (round-robin), so a slow spell of the machine touches them alike."""
    from codexmini.ops.layouts import pack_bits
    from codexmini.runtime.kernels import to_lowbit_panels, to_panels

    g = torch.Generator().manual_seed(3)
    empty = torch.empty(0, dtype=torch.uint8)
    shapes = STACKS[stack]
    kernels = []  # (label, call, weights, extra arguments, bits, weight bytes)
    for bits in (4, 3, 2):
        weights = []
        for N, K in shapes:
            q = pack_bits(torch.randint(0, 1 << bits, (N, K), generator=g), bits)
            s = (torch.rand(N, K // 32, generator=g) * 0.01).half()
            weights.append((q, s))
        nbytes = sum(q.numel() + s.numel() * 2 for q, s in weights)
        kernels.append((f"int{bits} g32 file layout", getattr(ext, f"q{bits}_linear"), weights, (None, True), bits,
                        nbytes))
        if ext.panels():
            P = ext.panels()
            panels = [(to_panels(q, P, 4) if bits == 4 else to_lowbit_panels(q, bits, P), to_panels(s, P))
                      for q, s in weights]
            kernels.append((f"int{bits} g32 panels", getattr(ext, f"q{bits}p_linear"), panels, (None,), bits, nbytes))
    xs = {m: {K: torch.randn(m, K, generator=g) for K in {K for _, K in shapes}} for m in rows}
    times = {(i, m): [] for i in range(len(kernels)) for m in rows}
    for _ in range(passes):
        for i, (_, call, ws, extra, bits, _) in enumerate(kernels):
            for m in rows:
                t0 = time.perf_counter()
                for q, s in ws:
                    call(xs[m][q.shape[1] * 8 // bits], q, s, empty, *extra)
                times[i, m].append(time.perf_counter() - t0)
    print("| kernel | " + " | ".join(f"{m} row(s): ms / GB/s" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for i, (label, _, _, _, _, nbytes) in enumerate(kernels):
        cells = []
        for m in rows:
            t = statistics.median(times[i, m])
            cells.append(f"{t * 1e3:.2f} / {nbytes / t / 1e9:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--table", choices=["all", "onerow", "lowbit", "rows", "stack"], default="all")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--stack", choices=sorted(STACKS), default="smollm2",
                   help="table 4's matrices: SmolLM2-135M's 210, or twelve 8192x2048 (the kernels' own bytes/s)")
    args = p.parse_args()
    from codexmini.runtime import native

    if args.threads:
        torch.set_num_threads(args.threads)
    ext = native.load()
    print(f"# one-row matmul, median of up to {args.repeats} calls, threads={torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, codexmini kernels: "
          f"{ext.isa() if ext else 'not built: ' + str(native.load_error())}\n")
    if args.table in ("all", "onerow"):
        one_row_table(ext, args.repeats)
        print()
    if args.table in ("all", "lowbit"):
        if ext is None:
            print("(codexmini's kernels are not built here: no low-bit table)")
        else:
            low_bit_table(ext, args.repeats)
            print()
    if args.table in ("all", "rows") and ext is not None:
        rows_table(ext, args.repeats)
        print()
    if args.table in ("all", "stack") and ext is not None:
        stack_table(ext, stack=args.stack)


if __name__ == "__main__":
    main()
