"""The stage registry: a stage in a package of its own (here a temporary one, installed as a plugin through an entry
point) plugs into recipes, validate and the CLI without any edit to codexmini."""

from __future__ import annotations

import json
import textwrap

import pytest
from safetensors.torch import load_file

from codexmini import stages
from codexmini.cli import main

TOY_STAGE = '''
"""A toy stage: scales every RMSNorm weight of the model."""
from dataclasses import dataclass

import torch

from codexmini.stages import Stage, register


@dataclass
class ToyConfig:
    scale: float = 1.0


def run(model, cfg: ToyConfig, ctx):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.mul_(cfg.scale)
    return model, {"toy_scale": cfg.scale, "toy_trainer_steps": ctx.config("trainer").max_steps,
                   "toy_index": ctx.index}


def check(cfg: ToyConfig, ctx):
    if cfg.scale <= 0:
        raise ValueError(f"toy.scale must be > 0, got {cfg.scale}")


register(Stage(name="toy", run=run, schema=ToyConfig, uses=("trainer",), check=check, help="scale the norms"))
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """A package `toy_stage_pkg` with a stage module and a dist-info declaring the entry point, on sys.path."""
    site = tmp_path / "site"
    pkg = site / "toy_stage_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text(TOY_STAGE)
    dist = site / "toy_stage_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stage-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{stages.ENTRY_POINT_GROUP}]\ntoy = toy_stage_pkg.stage\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(stages, "_REGISTRY", dict(stages.stages()))  # the built-in ones, loaded before the copy
    stages.reload()
    yield
    monkeypatch.undo()
    stages.reload()


def _recipe(folder):
    """A user's folder: one config group for the toy stage and a recipe that uses it."""
    (folder / "toy").mkdir(parents=True)
    (folder / "toy" / "double.yaml").write_text("# Doubles the norms.\nscale: 2.0\n")
    (folder / "toy_run.yaml").write_text(textwrap.dedent("""\
        # codexmini run toy_run
        # The tiny smoke setup with only the toy stage.
        defaults:
          - base_run
          - teacher: tiny_random
          - model: tiny_from_teacher
          - data: stdlib_tiny
          - trainer: smoke
          - toy: double
          - _self_
        recipe: toy_run
        teacher:
          pretrain_steps: 0
        stages:
          - stage: toy
        """))
    return folder / "toy_run.yaml"


def test_a_plugin_stage_runs_in_a_recipe_through_the_registry_alone(toy_plugin, tmp_path, capsys):
    recipe = _recipe(tmp_path / "conf")
    assert "toy" in stages.stages()
    assert main(["validate", str(recipe)]) == 0
    assert main(["validate", str(recipe), "toy.scale=-1"]) == 1
    assert "toy.scale must be > 0" in capsys.readouterr().out
    assert main(["validate", str(recipe), "toy.scael=3"]) == 2  # the schema is typed like any other section
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'runs'}"]) == 0
    run_dir = tmp_path / "runs" / "toy_run" / "default"
    manifest = json.loads((run_dir / "01-toy" / "manifest.json").read_text())
    assert manifest["stage"] == "toy" and manifest["config"]["toy"] == {"scale": 2.0}
    assert manifest["metrics"]["toy_scale"] == 2.0 and manifest["metrics"]["toy_trainer_steps"] == 30
    assert manifest["metrics"]["toy_index"] == 1  # its place among the run's stages
    assert manifest["inputs"]["sha256"] == json.loads((run_dir / "00-init" / "manifest.json").read_text())[
        "outputs"]["model.safetensors"]
    before = load_file(run_dir / "00-init" / "model.safetensors")
    after = load_file(run_dir / "01-toy" / "model.safetensors")
    assert (after["model.norm.weight"] == 2 * before["model.norm.weight"]).all()
    # A changed setting of the stage's section redoes it; the init stage is kept.
    assert main(["run", str(recipe), f"output_dir={tmp_path / 'runs'}", "toy.scale=3"]) == 0
    out = capsys.readouterr().out
    assert "00-init: complete, skipped" not in out or "01-toy: running toy" in out
    assert json.loads((run_dir / "01-toy" / "manifest.json").read_text())["metrics"]["toy_scale"] == 3.0
    # The CLI grew a single-stage command for it, and `ls` lists it.
    assert main(["ls", "--config-dir", str(tmp_path / "conf")]) == 0
    out = capsys.readouterr().out
    assert "toy_run" in out and "toy/" in out and "double" in out and "scale the norms" in out
    assert main(["toy", str(run_dir / "01-toy"), "--recipe", str(recipe), f"output_dir={tmp_path / 'one'}"]) == 0


def test_registering_a_bad_or_clashing_stage_is_refused():
    def run(model, cfg, ctx):
        return model, {}

    stages.stages()
    with pytest.raises(ValueError, match="lower-case"):
        stages.register(stages.Stage(name="../evil", run=run))
    with pytest.raises(ValueError, match="already registered"):
        stages.register(stages.Stage(name="distill", run=run))
    with pytest.raises(ValueError, match="reserved"):
        stages.register(stages.Stage(name="mine", run=run, schema=stages.Stage, section="trainer"))


def test_unknown_stage_names_the_close_match():
    with pytest.raises(KeyError, match="Did you mean 'distill'"):
        stages.get("distil")
