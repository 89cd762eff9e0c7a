"""The optimizer and learning-rate schedule every training stage uses."""

from __future__ import annotations

import torch

from .config import TrainerConfig


def build_optimizer(params, trainer: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that require a gradient (bitsandbytes' 8-bit AdamW for adamw_8bit)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter of the model or its extra modules requires a gradient")
    if trainer.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=trainer.lr, weight_decay=trainer.weight_decay)
        except (ImportError, RuntimeError) as err:
            raise RuntimeError(f"trainer.optimizer=adamw_8bit needs a working bitsandbytes (pip install "
                               f"bitsandbytes): {err}") from err
    # beta2 = 0.95 as in most LM pretraining recipes: steadier on short, noisy runs than the default 0.999.
    return torch.optim.AdamW(params, lr=trainer.lr, weight_decay=trainer.weight_decay, betas=(0.9, 0.95))


def build_scheduler(optimizer, trainer: TrainerConfig):
    """Linear warmup over `warmup_steps`, then cosine decay to zero at `max_steps`."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, trainer.warmup_steps, trainer.max_steps)
