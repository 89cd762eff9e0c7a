"""Knowledge distillation: losses and the training loop."""

from .losses import LOSSES, chunked_kd_loss, divergence
from .loop import DistillConfig, TrainerConfig, distill

__all__ = ["LOSSES", "DistillConfig", "TrainerConfig", "chunked_kd_loss", "distill", "divergence"]
