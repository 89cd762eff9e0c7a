"""Step checkpoints and exact resume.

`<workdir>/checkpoints/step_N/` holds everything a run needs to continue as if never stopped: the model (and any
extra trained modules) as safetensors, the optimizer and scheduler state, the RNG state, and `state.json` with the
step, a stage's own JSON state and the size and sha256 of every other file. A checkpoint is written into a hidden
temporary folder and renamed into place once complete, and state.json is written last, so a kill at any moment
leaves either the old set of checkpoints or the new one. Resume takes the newest checkpoint whose files still
match state.json: a truncated or corrupted one (a full disk, a copy cut short) is skipped with a warning and the
one before it is used, which is why `keep` defaults to 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from ..files import no_space_error, sha256_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
_RESERVED = {"model", "optimizer", "scheduler", "rng", "state"}


def _steps(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, scheduler, keep: int = 2,
                    modules: dict | None = None, state: dict | None = None) -> Path:
    """Write `step_<step>/` atomically and delete all but the newest `keep` checkpoints.

    Args:
        model: the (unwrapped) model; saved as model.safetensors.
        modules: extra trained modules {name: module}, each saved as `<name>.safetensors`.
        state: JSON-able state of the stage (counters and the like), returned by `load_checkpoint`.
    """
    from safetensors.torch import save_model

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    modules = modules or {}
    bad = [n for n in modules if n in _RESERVED or not re.fullmatch(r"[A-Za-z0-9_]+", n)]
    if bad:
        raise ValueError(f"extra module names {bad} must be plain identifiers other than {sorted(_RESERVED)}")
    stale_checkpoint_temporaries(ckpt_dir)
    final, tmp = ckpt_dir / f"step_{step}", ckpt_dir / f".step_{step}.tmp"
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir())}
        # state.json is written last: a folder without it (or whose files no longer match it) is never resumed
        # from.
        (tmp / "state.json").write_text(json.dumps({"step": step, "files": files, "state": state or {}}, indent=1))
    except Exception as err:
        # torch.save on a full disk says "unexpected pos 139136 vs 139024": say what it is, while the partial
        # files still take their space (that is how it is recognised), then drop them.
        full = no_space_error(err, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None and full is not err:
            raise OSError(full.errno, f"no space left on device while writing the step {step} checkpoint in "
                                      f"{ckpt_dir}; free some space and try again") from err
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _steps(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def stale_checkpoint_temporaries(ckpt_dir: str | Path) -> None:
    """Remove the temporary folders of saves a killed run left behind (`.step_N.tmp/`, full-size). Only one
    process writes a run's checkpoints (the pipeline locks the run folder), so none of them is being written."""
    for stale in Path(ckpt_dir).glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is intact."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        files, step = meta["files"], int(meta["step"])
    except FileNotFoundError:
        return "no state.json (the save did not finish)"
    except (ValueError, KeyError, TypeError) as err:
        return f"state.json is unreadable ({err})"
    if f"step_{step}" != path.name:
        return f"state.json says step {step}"
    if "model.safetensors" not in files:
        return "state.json lists no model.safetensors"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
        if sha256_file(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest intact checkpoint under `ckpt_dir` (damaged newer ones are skipped with a warning), or None.
    Stale temporary folders of interrupted saves are removed first."""
    if Path(ckpt_dir).is_dir():
        stale_checkpoint_temporaries(ckpt_dir)
    for _, path in reversed(_steps(Path(ckpt_dir))):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: str | Path, model, optimizer, scheduler, modules: dict | None = None) -> tuple[int, dict]:
    """Restore everything `save_checkpoint` wrote into the given objects; returns (step, stage state)."""
    from safetensors.torch import load_model

    path = Path(path)
    load_model(model, str(path / "model.safetensors"))
    for name, module in (modules or {}).items():
        load_model(module, str(path / f"{name}.safetensors"))
    # Our own files, still loaded without unpickling arbitrary objects.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    meta = json.loads((path / "state.json").read_text())
    return int(meta["step"]), meta.get("state", {})
