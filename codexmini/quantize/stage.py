"""The quantize stage: a scheme per linear layer, codes by RTN / GPTQ / AWQ on calibration blocks."""

from __future__ import annotations

from collections import Counter

from ..data import perplexity
from ..models.qat import plan_problems
from ..stages import Stage, register
from .apply import QuantizeConfig, check_config, file_overhead_bytes, plan, quantize_model


def run_quantize(model, cfg: QuantizeConfig, ctx):
    plan(model, cfg)  # bad schemes or group sizes fail here, before the calibration passes
    before = perplexity(model, ctx.data.val, batch_size=8)["ppl"]
    model, report = quantize_model(model, cfg, ctx.data.calibration, file_overhead_bytes(ctx.tokenizer, model))
    counts = dict(Counter(report["schemes"].values()))
    print(f"[codexmini] quantized {len(report['schemes'])} linear layers ({cfg.method}: {counts}); "
          f"{report['bits_per_weight']:.2f} bits/weight", flush=True)
    return model, {"val_ppl_before": before, "quantize": report, "scheme_counts": counts}


def check(cfg: QuantizeConfig, ctx) -> None:
    check_config(cfg)


def shapes(cfg: QuantizeConfig, ctx, config):
    return None, plan_problems(config, cfg)  # later stages see a quantized model: not followed further


register(Stage(name="quantize", run=run_quantize, schema=QuantizeConfig, uses=("data",), check=check, shapes=shapes,
               help="int8 / int4 weights (RTN, GPTQ, AWQ)"))
