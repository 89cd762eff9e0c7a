"""The trainer's schema: how any training stage optimises, and the check that refuses bad values up front."""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw_8bit")


@dataclass
class TrainerConfig:
    """How any training stage optimises: steps, batches, schedule, precision, checkpoints, metric tracking."""

    max_steps: int = 100
    batch_size: int = 4  # blocks per optimizer step, over all processes
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16 (auto: bf16 where the device does it fast)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | adamw_8bit (bitsandbytes)
    eval_every: int = 50
    eval_blocks: int | None = None  # None: all validation blocks
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    # Where metrics go besides metrics.jsonl: any tracker accelerate knows (tensorboard | wandb | mlflow | aim |
    # comet_ml | clearml | dvclive | swanlab | trackio) or none. Only runs given a workdir log.
    log_with: str = "tensorboard"


def check_trainer_config(trainer: TrainerConfig) -> None:
    """Refuse bad values before any model is touched; every message names its `trainer.` key."""
    from .tracking import check_tracker

    if trainer.mixed_precision not in PRECISIONS:
        raise ValueError(f"trainer.mixed_precision {trainer.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
    if trainer.optimizer not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer {trainer.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "log_every",
                 "keep_checkpoints"):
        if getattr(trainer, name) < 1:
            raise ValueError(f"trainer.{name} must be >= 1, got {getattr(trainer, name)}")
    if trainer.lr <= 0:
        raise ValueError(f"trainer.lr must be > 0, got {trainer.lr}")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
        if getattr(trainer, name) < 0:
            raise ValueError(f"trainer.{name} must be >= 0, got {getattr(trainer, name)}")
    if trainer.eval_blocks is not None and trainer.eval_blocks < 1:
        raise ValueError(f"trainer.eval_blocks must be >= 1 or null, got {trainer.eval_blocks}")
    check_tracker(trainer.log_with)
