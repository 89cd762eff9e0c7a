"""Knowledge distillation: losses and the distillation stage on the shared trainer (`codexmini.train`)."""

from .losses import LOSSES, chunked_kd_loss, divergence
from .loop import DistillConfig, distill

__all__ = ["LOSSES", "DistillConfig", "chunked_kd_loss", "distill", "divergence"]
