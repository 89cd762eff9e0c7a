"""The trainer's schema: how any training stage optimises, and the check that refuses bad values up front."""

from __future__ import annotations

import math
from dataclasses import dataclass

PRECISIONS = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw_8bit")
SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; Python's random any int


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
        check_int(f"trainer.{name}", getattr(trainer, name), low=1)
    check_int("trainer.warmup_steps", trainer.warmup_steps, low=0)
    check_int("trainer.seed", trainer.seed, low=0, high=SEED_MAX)
    check_number("trainer.lr", trainer.lr, positive=True)
    for name in ("weight_decay", "max_grad_norm"):
        check_number(f"trainer.{name}", getattr(trainer, name), low=0)
    if trainer.eval_blocks is not None:
        check_int("trainer.eval_blocks", trainer.eval_blocks, low=1, none="or null")
    check_tracker(trainer.log_with)


def check_int(key: str, value, low: int | None = None, high: int | None = None, none: str = "") -> None:
    """`value` must be an int (not a bool) within [low, high]; the message names `key`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]" if low is not None else f"<= {high}"
        raise ValueError(f"{key} must be {bound}{' ' + none if none else ''}, got {value}")


def check_number(key: str, value, low: float | None = None, high: float | None = None, positive: bool = False,
                 below: float | None = None) -> None:
    """`value` must be a finite real number (NaN and infinities are refused: every comparison with NaN is false,
    so a range check alone would let it through): >= low, <= high, > 0 when `positive`, < below."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{key} must be > 0, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{key} must be <= {high}, got {value}")
    if below is not None and not value < below:
        raise ValueError(f"{key} must be < {below}, got {value}")
