"""Benchmark softmax vs linear vs hybrid attention layers on CPU.

Prints two tables (median of --repeats runs; ratios against softmax at the same length, measured in the same run):
  1. forward+backward time and peak extra memory of one attention layer at sequence lengths 512 .. 8192;
  2. decode time per token at context 128 .. 8192 (prefill the context, then time single-token steps).

Each point runs one untimed warm-up first. Peak memory is the growth of the worker process's max RSS over its state after the layer and inputs were built;
each (layer, length) point runs in a fresh subprocess so peaks do not leak between points.

    .venv/bin/python scripts/bench_attention.py            # full table (a few minutes on 2 cores)
    .venv/bin/python scripts/bench_attention.py --quick    # small lengths only
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "softmax": dict(layer="softmax", feature_map="elu"),
    "linear-elu": dict(layer="linear", feature_map="elu"),
    "linear-hedgehog": dict(layer="linear", feature_map="hedgehog"),
    "hybrid-hedgehog": dict(layer="hybrid", feature_map="hedgehog"),
}


def _layer(variant: str, hidden: int, heads: int, kv_heads: int):
    import torch

    from codexmini import CodexMiniConfig
    from codexmini.models.attention import ATTENTION_CLASSES

    v = VARIANTS[variant]
    cfg = CodexMiniConfig(vocab_size=16, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=hidden, layer_types=[v["layer"]],
                          feature_map=v["feature_map"], sliding_window=64, linear_chunk_size=64)
    torch.manual_seed(0)
    return cfg, ATTENTION_CLASSES[v["layer"]](cfg, 0)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    import torch

    from codexmini.models.cache import CodexMiniCache
    from codexmini.models.modeling import rotary_cos_sin

    torch.set_num_threads(args.threads)
    cfg, layer = _layer(args.variant, args.hidden, args.heads, args.kv_heads)
    times = []
    if args.mode == "train":
        T = args.length
        x = torch.randn(1, T, args.hidden, requires_grad=True)
        cos, sin = rotary_cos_sin(torch.arange(T)[None], cfg.head_dim, cfg.rope_theta, x.dtype)
        base = _rss_mb()  # before the warm-up: max RSS only grows, so the warm-up's peak is the step's peak
        layer(x, cos, sin).sum().backward()  # warm-up: one-time allocations and kernel selection
        layer.zero_grad(set_to_none=True)
        x.grad = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            layer(x, cos, sin).sum().backward()
            times.append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
            x.grad = None
        print(json.dumps({"seconds": statistics.median(times), "peak_mb": _rss_mb() - base}))
        return
    C, steps = args.length, args.steps
    cache = CodexMiniCache(1)
    with torch.no_grad():
        x = torch.randn(1, C, args.hidden)
        cos, sin = rotary_cos_sin(torch.arange(C)[None], cfg.head_dim, cfg.rope_theta, x.dtype)
        layer(x, cos, sin, None, cache)
        cache.seen_tokens = C
        tok = torch.randn(1, 1, args.hidden)
        for r in range(args.repeats):
            per = []
            for s in range(steps):
                pos = torch.tensor([[C + r * steps + s]])
                cos, sin = rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta, tok.dtype)
                t0 = time.perf_counter()
                layer(tok, cos, sin, None, cache)
                per.append(time.perf_counter() - t0)
            times.append(statistics.median(per))
    print(json.dumps({"seconds": statistics.median(times), "state_kb": cache.nbytes() / 1024}))


def run_point(args, variant, mode, length):
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--mode", mode, "--length", str(length),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--hidden", str(args.hidden),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="lengths 512/1024 and contexts 128/1024 only")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per repeat")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="softmax", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    train_lengths = [512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192]
    decode_contexts = [128, 1024] if args.quick else [128, 512, 2048, 8192]
    print(f"# one attention layer: hidden {args.hidden}, {args.heads} heads ({args.kv_heads} KV) of "
          f"{args.hidden // args.heads}, batch 1, fp32, {args.threads} threads, median of {args.repeats}")
    table(args, "forward + backward", "train", "T", train_lengths, "ms", 1, "peak MB", "peak_mb")
    table(args, "decode, one token", "decode", "context", decode_contexts, "ms/token", 3, "state KB", "state_kb")


def table(args, title, mode, length_name, lengths, time_name, decimals, extra_name, extra_key) -> None:
    """One markdown table: a row per (length, variant), time relative to softmax at the same length."""
    w = max(len(length_name), 5)
    print(f"\n## {title}")
    print(f"| {'variant':<16} | {length_name:>{w}} | {time_name:>9} | {'vs softmax':>10} | {extra_name:>9} |")
    print(f"|{'-' * 18}|{'-' * (w + 2)}|{'-' * 11}|{'-' * 12}|{'-' * 11}|")
    for n in lengths:
        base = None
        for variant in VARIANTS:
            r = run_point(args, variant, mode, n)
            if "error" in r:
                print(f"| {variant:<16} | {n:>{w}} | {'error':>9} | {r['error'][:40]} |")
                continue
            base = base or r["seconds"]
            print(f"| {variant:<16} | {n:>{w}} | {r['seconds'] * 1e3:>9.{decimals}f} | {r['seconds'] / base:>9.2f}x | "
                  f"{r[extra_key]:>9.0f} |", flush=True)

if __name__ == "__main__":
    main()
