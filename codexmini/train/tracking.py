"""Where training metrics go: metrics.jsonl in the stage folder always, and any tracker accelerate knows.

`trainer.log_with` names the tracker (tensorboard by default; wandb, mlflow, aim, comet_ml, clearml, dvclive, ...
or none). TensorBoard event files land in `<workdir>/tensorboard/`. TensorBoard is an optional extra (report),
so when the default tracker's package is missing a run still trains and writes metrics.jsonl, with a warning; a
tracker chosen by name that is not installed is an error naming the package to install.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

DEFAULT_TRACKER = "tensorboard"
# tracker -> (modules that provide it, pip package). accelerate's own LoggerType lists which names exist.
_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "aim": (("aim",), "aim"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}


class TrackerUnavailable(ImportError, ValueError):
    """The chosen tracker's package is not installed (a ValueError too, so config validation reports it)."""


def tracker_names() -> tuple[str, ...]:
    """Every value `trainer.log_with` accepts: accelerate's trackers and 'none'."""
    from accelerate.utils import LoggerType

    return (*(t.value for t in LoggerType if t.value != "all"), "none")


def tracker_installed(name: str) -> bool:
    modules = _PACKAGES.get(name, ((name,), name))[0]
    return any(importlib.util.find_spec(m) is not None for m in modules)


def check_tracker(name: str) -> None:
    """A known tracker name whose package is installed (the default tensorboard may be missing: see above)."""
    names = tracker_names()
    if name not in names:
        raise ValueError(f"trainer.log_with {name!r} is not one of {', '.join(names)}")
    if name not in ("none", DEFAULT_TRACKER) and not tracker_installed(name):
        package = _PACKAGES.get(name, ((name,), name))[1]
        raise TrackerUnavailable(f"trainer.log_with={name} needs the {package} package: pip install {package}",
                                 name=package)


def resolve_tracker(name: str, workdir: Path | None) -> str | None:
    """The tracker a run uses: None without a workdir, for 'none', or when the default's package is missing."""
    check_tracker(name)
    if workdir is None or name == "none":
        return None
    if not tracker_installed(name):
        warnings.warn("trainer.log_with=tensorboard but tensorboard is not installed: metrics go to metrics.jsonl "
                      "only (pip install tensorboard, or the 'report' extra; trainer.log_with=none silences this)",
                      stacklevel=3)
        return None
    return name


class MetricsLog:
    """One record per logged step, to `<workdir>/metrics.jsonl` and the tracker; writes on the main process only.

    Args:
        accelerator: the run's Accelerator, created with `log_with=tracker` and `project_dir=workdir`.
        tracker: a name from `resolve_tracker` (None: metrics.jsonl only).
        config: hyperparameters handed to trackers that record them (not TensorBoard: its hparams go to a second
            event folder, beside the scalars).
    """

    def __init__(self, accelerator, workdir: Path | None, tracker: str | None, config: dict | None = None):
        self.accelerator, self.tracker = accelerator, tracker
        main = accelerator.is_main_process
        self.path = workdir / "metrics.jsonl" if workdir is not None and main else None
        self.file = None
        if tracker is not None:
            # TensorBoard's run name is its folder: <workdir>/tensorboard/.
            project = "tensorboard" if tracker == "tensorboard" else "codexmini"
            accelerator.init_trackers(project, config=None if tracker == "tensorboard" else config)

    def log(self, record: dict) -> None:
        """`record` holds "step" and scalar values."""
        if self.path is not None and self.file is None:
            self.file = _reopen(self.path, record["step"])
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tracker is not None:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.path = None
        if self.tracker is not None:
            self.accelerator.end_training()
            self.tracker = None


def _reopen(path: Path, first_step: int):
    """metrics.jsonl opened for appending from `first_step` on. A resumed run logs again the steps it redoes after
    its checkpoint (a killed run may have logged some of them, and its last line may be cut short): the records
    from `first_step` on, and any unreadable line, are dropped first, so every step appears once and in order.
    The file is rewritten atomically, so a kill now leaves either the old or the new one."""
    if path.is_file():
        from ..files import write_atomic

        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] < first_step:
                kept.append(line)
        write_atomic(path, "".join(line + "\n" for line in kept))
    return path.open("a")
