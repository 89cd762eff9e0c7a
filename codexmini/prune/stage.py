"""The prune stage: structured width pruning scored on calibration blocks (see `width.prune`)."""

from __future__ import annotations

from ..data import perplexity
from ..stages import Stage, register
from .width import PruneConfig, check_config, prune


def run_prune(model, cfg: PruneConfig, ctx):
    check_config(cfg, model.config)  # before any work: scoring needs calibration passes
    before = perplexity(model, ctx.data.val, batch_size=8)["ppl"]
    new, report = prune(model, cfg, ctx.data.calibration)
    print(f"[codexmini] pruned {report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({cfg.criterion}); sizes {report['sizes']}", flush=True)
    return new, {"val_ppl_before": before, "prune": report}


def check(cfg: PruneConfig, ctx) -> None:
    check_config(cfg)


register(Stage(name="prune", run=run_prune, schema=PruneConfig, uses=("data",), check=check,
               help="remove attention heads / MLP channels by importance"))
