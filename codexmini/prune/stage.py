"""The prune stage: structured width pruning scored on calibration blocks (see `width.prune`)."""

from __future__ import annotations

from ..data import perplexity
from ..stages import Stage, register
from .width import PruneConfig, check_config, prune, pruned_config, target_sizes, uniform_sizes


def run_prune(model, cfg: PruneConfig, ctx):
    check_config(cfg, model.config)  # before any work: scoring needs calibration passes
    before = perplexity(model, ctx.data.val, batch_size=8)["ppl"]
    new, report = prune(model, cfg, ctx.data.calibration)
    print(f"[codexmini] pruned {report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({cfg.criterion}); sizes {report['sizes']}", flush=True)
    return new, {"val_ppl_before": before, "prune": report}


def check(cfg: PruneConfig, ctx) -> None:
    check_config(cfg)


def shapes(cfg: PruneConfig, ctx, config):
    """Pruning by ratio sets the widths; a parameter budget, or dropping layers of a model whose layers differ,
    chooses them while running."""
    try:
        check_config(cfg, config)
    except ValueError as err:
        return None, [str(err)]
    if cfg.param_budget or (cfg.drop_layers and not uniform_sizes(config)):
        return None, []
    try:
        return pruned_config(config, target_sizes(config, cfg)), []
    except ValueError as err:
        return None, [f"prune: {err}"]


register(Stage(name="prune", run=run_prune, schema=PruneConfig, uses=("data",), check=check, shapes=shapes,
               help="remove attention heads / MLP channels by importance"))
