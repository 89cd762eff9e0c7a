"""The wheel is the product: built from the tree, installed in a fresh virtual environment, it runs the packaged
recipes and a user's own from an empty folder (no checkout on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, its environment, an empty working folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
          ROOT], cwd=tmp, env=env)
    wheel = next((tmp / "dist").glob("codexmini-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    py = venv / "bin" / "python"
    # The fresh environment gets this one's third-party packages (torch and friends, not codexmini: the editable
    # install's hook is a .pth file that a path line does not run) so that no registry is needed.
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel], cwd=tmp, env=env)
    work = tmp / "empty"
    work.mkdir()
    return py, env, work, wheel


def test_the_wheel_ships_configs_and_recipes(installed):
    *_, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "codexmini/recipes/tiny_smoke.yaml" in names and "codexmini/recipes/quickstart.yaml" in names
    assert "codexmini/configs/trainer/smoke.yaml" in names and "codexmini/runtime/csrc/cmx_kernels.cpp" in names


def test_installed_wheel_runs_recipes_from_an_empty_folder(installed):
    py, env, work, _ = installed
    cli = [py, "-m", "codexmini.cli"]
    where = _run([py, "-c", "import codexmini; print(codexmini.__file__)"], work, env)
    assert str(py.parents[1]) in where  # the installed copy, not the checkout
    out = _run([*cli, "ls"], work, env)
    assert "tiny_smoke" in out and "quickstart" in out and "trainer/" in out
    assert "valid" in _run([*cli, "validate", "tiny_smoke"], work, env)
    out = _run([*cli, "run", "tiny_smoke", "output_dir=runs"], work, env)
    assert (work / "runs" / "tiny_smoke" / "default" / "06-export" / "model.cmx").is_file(), out[-2000:]
    # A team's own folder: a new trainer option and a recipe using it, by name through --config-dir.
    mine = work / "team"
    (mine / "trainer").mkdir(parents=True)
    (mine / "trainer" / "two_steps.yaml").write_text("max_steps: 2\nbatch_size: 2\ncheckpoint_every: 100\n")
    (mine / "ours.yaml").write_text(textwrap.dedent("""\
        # codexmini run ours --config-dir team
        # Two distillation steps on the tiny smoke setup.
        defaults:
          - base_run
          - teacher: tiny_random
          - model: tiny_from_teacher
          - data: stdlib_tiny
          - trainer: two_steps
          - _self_
        recipe: ours
        teacher: {pretrain_steps: 0}
        stages: [{stage: distill}]
        """))
    _run([*cli, "run", "ours", "--config-dir", "team", "output_dir=runs"], work, env)
    manifest = (work / "runs" / "ours" / "default" / "01-distill" / "manifest.json").read_text()
    assert '"max_steps": 2' in manifest
