"""The distill stage (knowledge distillation, optionally quantization-aware) and the transfer stage (attention
transfer for linearized layers)."""

from __future__ import annotations

from dataclasses import replace

from ..data import perplexity
from ..models.qat import fake_quantized, plan_problems, plan_schemes
from ..stages import Stage, register
from .attention_transfer import TransferConfig, attention_transfer
from ..train.config import SEED_MAX, check_int, check_number
from .loop import DistillConfig, check_configs, distill

STAGE_SEED_STRIDE = 1_000_003  # a prime: stage k's batch order is seeded trainer.seed + k * this


def stage_trainer(trainer, index: int):
    """The trainer settings of the run's `index`-th stage: its batches drawn in an order of its own. With the run's
    seed alone, every training stage began on the same blocks: the quickstart's heal stage trained on the blocks
    of its distill stage's first 15 steps again, and lost ground on every held-out domain it did not improve."""
    return replace(trainer, seed=(trainer.seed + STAGE_SEED_STRIDE * index) % SEED_MAX) if index else trainer


def run_distill(model, cfg: DistillConfig, ctx):
    trainer = stage_trainer(ctx.config("trainer"), ctx.index)
    teacher = ctx.teacher if cfg.kd_ratio > 0 or cfg.hidden_weight > 0 else None

    def train(m):
        return distill(m, teacher, ctx.data.train, ctx.data.val, cfg, trainer, workdir=ctx.folder,
                       tokenizer=ctx.tokenizer)

    if not cfg.fake_quant:
        return train(model)
    q = ctx.config("quantize")
    schemes = plan_schemes(model, q.rules, q.default, untie_head=q.untie_head, on_bad_group=q.on_bad_group)
    with fake_quantized(model, schemes):
        model, metrics = train(model)
        # Perplexity as the quantize stage will see it (the fake-quantized weights), before they are removed.
        metrics["val_ppl_fake_quant"] = perplexity(model, ctx.data.val, batch_size=8)["ppl"]
    return model, {**metrics, "fake_quant_schemes": len(schemes)}


def distill_uses(cfg: DistillConfig | None) -> tuple[str, ...]:
    # Quantization-aware distillation trains on the quantize section's grid, so that section keys it too.
    return ("trainer", "data", "teacher", *(("quantize",) if cfg is not None and cfg.fake_quant else ()))


def check_distill(cfg: DistillConfig, ctx) -> None:
    check_configs(cfg, ctx.config("trainer"))
    block = getattr(ctx.config("data"), "block_size", None)
    samples = cfg.on_policy_fraction > 0 or cfg.sequence_level_fraction > 0
    if samples and isinstance(block, int) and cfg.on_policy_prompt_tokens >= block:
        raise ValueError(f"distill.on_policy_prompt_tokens ({cfg.on_policy_prompt_tokens}) must be shorter than "
                         f"data.block_size ({block}): the rest of each block is what the student (on-policy) or "
                         "the teacher (sequence-level) samples")
    if cfg.fake_quant:
        q = ctx.config("quantize")
        plan_schemes(None, q.rules, q.default, untie_head=q.untie_head, on_bad_group=q.on_bad_group)


def run_transfer(model, cfg: TransferConfig, ctx):
    # Its own optimiser settings (fp32, no warmup; see transfer_trainer), not the distillation trainer's.
    return attention_transfer(model, ctx.data.train, ctx.data.val, cfg, workdir=ctx.folder)


def check_transfer(cfg: TransferConfig, ctx) -> None:
    check_int("transfer.steps", cfg.steps, low=0)
    check_int("transfer.batch_size", cfg.batch_size, low=1)
    check_number("transfer.lr", cfg.lr, positive=True)
    if cfg.train not in ("feature_maps", "attention"):
        raise ValueError(f"transfer.train {cfg.train!r} is not one of feature_maps, attention")
    check_int("transfer.seed", cfg.seed, low=0, high=SEED_MAX)


def distill_shapes(cfg: DistillConfig, ctx, config):
    # Training keeps the widths; under QAT the quantize section's grid must fit them.
    return config, plan_problems(config, ctx.config("quantize")) if cfg.fake_quant else []


register(Stage(name="distill", run=run_distill, schema=DistillConfig, uses=distill_uses, check=check_distill,
               shapes=distill_shapes,
               help="knowledge distillation from the teacher (KD losses, QAT with distill.fake_quant)"))
register(Stage(name="transfer", run=run_transfer, schema=TransferConfig, uses=("data",), check=check_transfer,
               help="attention transfer: linearized layers learn to imitate softmax attention"))
