"""Issue 16, item 5 (and item 8's checkpoint fallback): a run folder is locked while a run writes it, so a second
run of the same `run_name` fails fast naming the first process; a run killed with SIGKILL and resumed has every
step once in metrics.jsonl, also when its newest checkpoint was damaged (the one before it is used)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hardening.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
LONG = ["teacher.pretrain_steps=0", "stages=[{stage: distill}]", "trainer.log_every=1", "trainer.log_with=none"]


def _start(out: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "codexmini.cli", "run", "tiny_smoke", f"output_dir={out}", *LONG, *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)


def _wait(condition, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended (exit {proc.returncode}) before the test could act")
        if time.time() > deadline:
            pytest.fail("timed out waiting for the first run")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _steps(metrics: Path) -> list[int]:
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def test_a_second_run_of_the_same_folder_fails_fast_naming_the_first(tmp_path, capsys):
    out = tmp_path / "runs"
    lock = out / "tiny_smoke" / "default" / ".lock"
    first = _start(out, "trainer.max_steps=100000", "trainer.eval_every=100000")
    try:
        _wait(lambda: lock.is_file() and lock.read_text().startswith("pid"), first)
        t0 = time.perf_counter()
        assert run_cli("run", "tiny_smoke", f"output_dir={out}", *LONG, "trainer.max_steps=2") == 2
        took = time.perf_counter() - t0
        err = capsys.readouterr().err
        assert f"is in use by pid {first.pid}" in err and "run_name=" in err
        assert took < 15  # refused at the lock, before any teacher or data is built
        assert first.poll() is None  # the first run goes on
    finally:
        _kill(first)
    # Once the holder is gone (even killed), the lock is free: the kernel drops it with the process.
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *LONG, "trainer.max_steps=2") == 0


def test_kill_then_resume_logs_every_step_once_and_survives_a_damaged_checkpoint(tmp_path):
    out = tmp_path / "runs"
    stage = out / "tiny_smoke" / "default" / "01-distill"
    # Enough steps that the run is far from done when it is killed just after step 12.
    overrides = ["trainer.max_steps=60", "trainer.checkpoint_every=5", "trainer.keep_checkpoints=2"]
    first = _start(out, *overrides)

    def newest_checkpoint() -> int:
        return max((int(p.name.split("_")[1]) for p in (stage / "checkpoints").glob("step_*")), default=0)

    try:
        # Kill after two checkpoints, with steps logged past the newest one. The run goes on between a look and a
        # kill (it reached its next checkpoint there once), so it is stopped (SIGSTOP) to look, and let go on
        # until the look finds what the test needs.
        while True:
            _wait(lambda: (stage / "checkpoints" / "step_10" / "state.json").is_file() and
                  (stage / "metrics.jsonl").is_file() and max(_steps(stage / "metrics.jsonl"), default=0) >= 12, first)
            first.send_signal(signal.SIGSTOP)
            if max(_steps(stage / "metrics.jsonl"), default=0) > newest_checkpoint():
                break
            first.send_signal(signal.SIGCONT)
            time.sleep(0.05)
    finally:
        _kill(first)
    assert not (stage / "manifest.json").exists()
    logged = _steps(stage / "metrics.jsonl")
    newest = newest_checkpoint()
    assert max(logged) > newest  # steps the resumed run will do (and log) again
    # Damage the newest checkpoint (a save cut short by a full disk), and leave the litter a kill -9 leaves.
    weights = stage / "checkpoints" / f"step_{newest}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    litter = [stage / "checkpoints" / f".step_{newest + 5}.tmp", stage / f".model.safetensors.{os.getpid()}.tmp",
              stage / ".staged.abc123", stage.parent / ".config.yaml.xyz.tmp"]
    for p in litter:
        if p.suffix == ".tmp" and p.parent.name == "checkpoints":
            p.mkdir(exist_ok=True)  # the kill may have come in the middle of that very save
            (p / "model.safetensors").write_bytes(b"\0" * 100_000)
        elif p.name.startswith(".staged."):
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"\0" * 100_000)
        else:
            p.write_bytes(b"\0" * 100_000)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*step_{newest}"):
        assert run_cli("run", "tiny_smoke", f"output_dir={out}", *LONG, *overrides) == 0
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from"] == newest - 5  # the intact one before the damaged one
    assert _steps(stage / "metrics.jsonl") == list(range(1, 61))  # every step once, in order
    assert not [p for p in litter if p.exists()]
