"""`codexmini` command line.

    codexmini student  --teacher SPEC --layers 0,2,4 --layer-types 1:linear,3:hybrid --out DIR
    codexmini generate MODEL_DIR --prompt "def fib(n):"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _parse_layers(text: str | None):
    if not text:
        return None
    if ":" in text:  # start:stop:step
        start, stop, *step = (int(x) for x in text.split(":"))
        return list(range(start, stop, step[0] if step else 1))
    return [int(x) for x in text.split(",")]


def _parse_types(text: str | None):
    if not text:
        return None
    out = {}
    for item in text.split(","):
        idx, _, kind = item.partition(":")
        if not kind:
            raise SystemExit(f"--layer-types item {item!r} must look like INDEX:TYPE (e.g. 3:linear)")
        out[int(idx)] = kind
    return out


def cmd_student(args) -> int:
    """Build a student from a teacher, measure both on held-out data, save the student, print a sample."""
    import torch

    from codexmini.data import DataConfig, build_data, perplexity
    from codexmini.models.from_teacher import student_from_teacher
    from codexmini.models.teacher import load_teacher

    torch.manual_seed(args.seed)
    out = Path(args.out)
    print(f"loading teacher {args.teacher} ...", flush=True)
    teacher, tok = load_teacher(args.teacher)
    student = student_from_teacher(teacher, _parse_layers(args.layers), _parse_types(args.layer_types),
                                   feature_map=args.feature_map, sliding_window=args.sliding_window)
    data = build_data(DataConfig(max_files=args.max_files, block_size=args.block_size,
                                 max_val_blocks=args.val_blocks, seed=args.seed), tok)
    rows = []
    for name, model in (("teacher", teacher), ("student", student)):
        t0 = time.perf_counter()
        ppl = perplexity(model, data.val, batch_size=4, progress=True)
        rows.append((name, model.num_parameters(), ppl["ppl"], time.perf_counter() - t0))
    print(f"\n{'model':<8} {'params':>12} {'val ppl':>10} {'eval s':>8}")
    for name, n, ppl, secs in rows:
        print(f"{name:<8} {n:>12,} {ppl:>10.2f} {secs:>8.1f}")
    print(f"layer types: {student.config.layer_types}")
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tok.save_pretrained(out)
    metrics = {"teacher_val_ppl": rows[0][2], "student_val_ppl": rows[1][2], "teacher_params": rows[0][1],
               "student_params": rows[1][1], "val_tokens": data.stats["tokens_val"]}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    print(f"saved student to {out}")
    sample = _generate(student, tok, args.prompt, 32)
    print(f"\nstudent sample (greedy, before any distillation):\n{args.prompt}{sample}")
    return 0


def _generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def cmd_generate(args) -> int:
    from codexmini.models.teacher import load_teacher

    model, tok = load_teacher(args.model)
    print(args.prompt + _generate(model, tok, args.prompt, args.max_new_tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codexmini", description="Distil, prune, quantize and ship small LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("student", help="build a student from a teacher and measure both on held-out data")
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="hub id, folder, .gguf or packaged name")
    p.add_argument("--layers", default="0:30:2", help="teacher layers to keep: 0,2,4 or start:stop:step")
    p.add_argument("--layer-types", default="3:linear,7:hybrid,11:linear",
                   help="student layers to linearize, INDEX:TYPE,... (others stay softmax)")
    p.add_argument("--feature-map", default="hedgehog", choices=["elu", "relu", "hedgehog", "taylor"])
    p.add_argument("--sliding-window", type=int, default=64)
    p.add_argument("--max-files", type=int, default=40, help="stdlib files in the corpus")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--val-blocks", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--out", default="runs/student")
    p.set_defaults(func=cmd_student)
    g = sub.add_parser("generate", help="generate text with a model folder or GGUF file")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
