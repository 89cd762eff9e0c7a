"""Does distillation beat plain cross-entropy, and how fast is a KD step? On the real offline teacher.

Same student init (SmolLM2-135M -> 20 layers by block influence, 3 linearized), same token blocks in the same
order (same seed), same steps: one run with the KD loss (forward KL + 10% CE), one with cross-entropy only.
Prints validation perplexity of both (held-out stdlib files), then throughput of each step kind and the fraction
of this machine's matmul peak (measured in the same run: median of 5 fp32 2048^3 matmuls) that it reaches.

`--data NAME` trains on a data config of `codexmini/configs/data/` instead (e.g. `mixture`: stdlib code, the
teacher's own samples, docs, man pages and licences, with other projects' Python held out) and adds a table per
domain: perplexity as a ratio to the teacher's and KL(teacher || student) on each domain's held-out documents.

    .venv/bin/python scripts/bench_distill.py --steps 40     # about 15 minutes on 2 cores
    .venv/bin/python scripts/bench_distill.py --steps 400 --data mixture     # the quickstart's budget x 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from omegaconf import OmegaConf

from codexmini.data import DataConfig, build_data, perplexity
from codexmini.data.domains import evaluate_domains
from codexmini.data.schema import as_data_config
from codexmini.config import compose
from codexmini.report import render_domains
from codexmini.distill import DistillConfig, distill
from codexmini.train import TrainerConfig
from codexmini.models.from_teacher import student_from_teacher
from codexmini.models.teacher import load_teacher
from codexmini.prune import select_layers

LAYER_TYPES = {5: "linear", 12: "hybrid", 18: "linear"}


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--keep-layers", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--precision", default="auto")
    p.add_argument("--data", help="a data config of codexmini/configs/data/ (default: 400 stdlib files)")
    args = p.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak_gflops()
    teacher, tok = load_teacher("smollm2-135m-instruct")
    held_out = []  # domains no step trains on
    if args.data:
        # the data group as a recipe composes it (unknown names are refused by Hydra with the ones it has)
        data_cfg = as_data_config(OmegaConf.to_container(compose("quickstart", [f"data={args.data}"]).data,
                                                         resolve=True))
        held_out = [src.name for _, src in data_cfg.resolved_sources() if src.eval_only]
        data = build_data(data_cfg, tok, teacher=teacher)
    else:
        data = build_data(DataConfig(max_files=400, block_size=256, max_val_blocks=16), tok)
    layers = select_layers(teacher, data.calibration, args.keep_layers)
    init = student_from_teacher(teacher, layers, {i: t for i, t in LAYER_TYPES.items() if i < len(layers)})
    teacher_ppl = perplexity(teacher, data.val)["ppl"]
    init_ppl = perplexity(init, data.val)["ppl"]
    trainer = TrainerConfig(max_steps=args.steps, batch_size=4, lr=args.lr, warmup_steps=max(args.steps // 10, 1),
                            eval_every=10 ** 9, checkpoint_every=10 ** 9, mixed_precision=args.precision)
    results, domains = {}, {}
    if len(data.val_domains) > 1:
        domains["teacher"] = evaluate_domains(teacher, data)
        domains["student init"] = evaluate_domains(init, data, teacher)
    for name, cfg, t in (("KD (forward KL, kd_ratio 0.9)", DistillConfig(kd_ratio=0.9), teacher),
                         ("cross-entropy only", DistillConfig(kd_ratio=0.0), None)):
        student, metrics = distill(copy.deepcopy(init), t, data.train, data.val, cfg, trainer, tokenizer=tok)
        results[name] = metrics
        if len(data.val_domains) > 1:
            domains[name] = evaluate_domains(student, data, teacher)
        del student
    tokens = args.steps * trainer.batch_size * data.train.shape[1]
    n_s, n_t = init.num_parameters(), teacher.num_parameters()
    print(f"\n# {args.steps} steps x {trainer.batch_size}x{data.train.shape[1]} tokens ({tokens:,} tokens), "
          f"precision {results[next(iter(results))]['precision']}, student {n_s:,} params, teacher {n_t:,}")
    print("\n| run | val ppl | vs init | vs teacher |")
    print("|---|---|---|---|")
    print(f"| student init | {init_ppl:.2f} | 1.00x | {init_ppl / teacher_ppl:.2f}x |")
    for name, m in results.items():
        print(f"| {name} | {m['val_ppl']:.2f} | {m['val_ppl'] / init_ppl:.2f}x | {m['val_ppl'] / teacher_ppl:.2f}x |")
    print(f"| teacher | {teacher_ppl:.2f} | | 1.00x |")
    if domains:
        names = list(data.val_domains)
        teacher_domains = domains.pop("teacher")
        print("\nPer domain (held-out documents): perplexity as a ratio to the teacher's; KL(teacher || student) in "
              "nats per token. Trained on: " + ", ".join(n for n in names if n not in held_out) +
              "; never trained on: " + (", ".join(held_out) or "none") + "\n")
        print(render_domains([{"stage": run, "domains": res, "teacher_domains": teacher_domains}
                              for run, res in domains.items()]))
    print(f"\nmatmul peak (fp32, 2048^3, median of 5): {peak:.0f} GFLOP/s")
    print("\n| step | tokens/s | model GFLOP/s | fraction of peak | vs CE step |")
    print("|---|---|---|---|---|")
    ce_tps = results["cross-entropy only"]["tokens_per_s"]
    for name, m in results.items():
        # 6 N per token for the student's forward + backward, 2 N for the teacher's forward.
        flops_per_token = 6 * n_s + (2 * n_t if name.startswith("KD") else 0)
        gflops = m["tokens_per_s"] * flops_per_token / 1e9
        print(f"| {name} | {m['tokens_per_s']:.0f} | {gflops:.0f} | {gflops / peak:.0%} | "
              f"{m['tokens_per_s'] / ce_tps:.2f}x |")


if __name__ == "__main__":
    main()
