"""The shared trainer, below every training stage: schema, accelerate loop, checkpoints and exact resume,
precision, batching and metric trackers. Stages (distill, finetune, ...) supply a loss and hooks to `fit`; this
package never imports a stage."""

from .batching import batch_indices, micro_batches, process_slice
from .checkpoint import checkpoint_problem, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainerConfig, check_trainer_config
from .loop import Batch, Hooks, LossFn, TrainContext, evaluate_perplexity, fit
from .losses import next_token_loss
from .optim import build_optimizer, build_scheduler
from .precision import reset_accelerate_precision, resolve_precision
from .pretrain import tiny_random_teacher
from .tracking import MetricsLog, TrackerUnavailable, check_tracker, resolve_tracker, tracker_names

__all__ = [
    "Batch", "Hooks", "LossFn", "MetricsLog", "TrackerUnavailable", "TrainContext", "TrainerConfig",
    "batch_indices", "build_optimizer", "build_scheduler", "check_tracker", "check_trainer_config",
    "checkpoint_problem", "evaluate_perplexity", "fit", "latest_checkpoint", "load_checkpoint", "micro_batches",
    "next_token_loss", "process_slice", "reset_accelerate_precision", "resolve_precision", "resolve_tracker",
    "save_checkpoint", "tiny_random_teacher", "tracker_names",
]
