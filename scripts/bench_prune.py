"""Structured pruning on the real offline teacher: which importance criterion, width vs depth, before and after
a short healing distillation.

SmolLM2-135M-Instruct is converted into an identical CodexMini model (all softmax layers) and pruned to 75% and
50% of its parameters: in width (query heads within KV groups + MLP channels, one ratio found for the budget) with
each importance criterion, and in depth (whole layers, by block influence or as one contiguous block). Every
pruned model is then healed by the same short distillation from the unpruned teacher (same blocks, same order,
same steps). Validation perplexity on held-out stdlib files.

    .venv/bin/python scripts/bench_prune.py --heal-steps 10     # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from codexmini.data import DataConfig, build_data, perplexity
from codexmini.distill import DistillConfig, distill
from codexmini.train import TrainerConfig
from codexmini.models.from_teacher import student_from_teacher
from codexmini.models.quantized import weight_count
from codexmini.models.teacher import load_teacher
from codexmini.prune import PruneConfig, prune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heal-steps", type=int, default=10)
    p.add_argument("--reductions", default="0.25,0.5")
    p.add_argument("--criteria", default="magnitude,taylor,wanda,random")
    args = p.parse_args()
    torch.manual_seed(0)
    teacher, tok = load_teacher("smollm2-135m-instruct")
    data = build_data(DataConfig(max_files=400, block_size=256, max_val_blocks=16), tok)
    base = student_from_teacher(teacher).float().eval()
    n0 = weight_count(base)
    teacher_ppl = perplexity(teacher, data.val)["ppl"]
    per_layer = (n0 - base.config.vocab_size * base.config.hidden_size - base.config.hidden_size) \
        / base.config.num_hidden_layers
    trainer = TrainerConfig(max_steps=args.heal_steps, batch_size=4, lr=3e-4, warmup_steps=2, eval_every=10 ** 9,
                            checkpoint_every=10 ** 9)
    rows = []
    for reduction in (float(r) for r in args.reductions.split(",")):
        configs = [(f"width, {c}", PruneConfig(criterion=c, param_budget=1 - reduction, budget_dims=["heads", "mlp"],
                                               head_mode="query_heads", round_to=64))
                   for c in args.criteria.split(",")]
        drop = math.ceil(reduction * n0 / per_layer)
        configs += [(f"depth, {m.replace('_', ' ')} ({drop} layers)",
                     PruneConfig(criterion="magnitude", drop_layers=drop, depth_method=m))
                    for m in ("block_influence", "contiguous")]
        for name, cfg in configs:
            t0 = time.perf_counter()
            pruned, report = prune(base, cfg, data.calibration)
            secs = time.perf_counter() - t0
            after = perplexity(pruned, data.val)["ppl"]
            healed, metrics = distill(copy.deepcopy(pruned).train(), teacher, data.train, data.val,
                                      DistillConfig(kd_ratio=0.9), trainer, tokenizer=tok)
            rows.append((reduction, name, report["params_after"], after, metrics["val_ppl"], secs))
            print(f"{reduction:.0%} {name}: {report['params_after']:,} params, ppl {after:.2f} -> "
                  f"{metrics['val_ppl']:.2f} after heal", flush=True)
    tokens = args.heal_steps * trainer.batch_size * data.train.shape[1]
    print(f"\n# SmolLM2-135M ({n0:,} params, val ppl {teacher_ppl:.2f}); heal = {args.heal_steps} KD steps "
          f"({tokens:,} tokens) from the unpruned teacher")
    print("\n| target | method | params | kept | val ppl pruned | val ppl healed | healed vs teacher | prune s |")
    print("|---|---|---|---|---|---|---|---|")
    for reduction, name, n, after, healed, secs in rows:
        print(f"| -{reduction:.0%} | {name} | {n:,} | {n / n0:.1%} | {after:.2f} | {healed:.2f} | "
              f"{healed / teacher_ppl:.2f}x | {secs:.1f} |")


if __name__ == "__main__":
    main()
