"""Recipes from a user's folder: `codexmini init`, `--config-dir`, recipes given as paths."""

from __future__ import annotations

import pytest

from codexmini.cli import main
from codexmini.config import compose, recipe_path


def test_init_copies_a_recipe_with_its_groups_and_the_copy_is_what_runs(tmp_path, capsys):
    dest = tmp_path / "mine"
    assert main(["init", "tiny_smoke", str(dest)]) == 0
    assert (dest / "tiny_smoke.yaml").is_file() and (dest / "trainer" / "smoke.yaml").is_file()
    assert (dest / "teacher" / "tiny_random.yaml").is_file() and (dest / "model" / "tiny_from_teacher.yaml").is_file()
    assert f"codexmini run {dest / 'tiny_smoke.yaml'}" in capsys.readouterr().out
    # Edit the copies: the recipe given as a path picks up the groups beside it, not the packaged ones.
    smoke = dest / "trainer" / "smoke.yaml"
    smoke.write_text(smoke.read_text().replace("max_steps: 30", "max_steps: 3"))
    assert compose(str(dest / "tiny_smoke.yaml")).trainer.max_steps == 3
    assert compose("tiny_smoke").trainer.max_steps == 30
    # By name from --config-dir, and a new option of their own in a group.
    (dest / "trainer" / "tiny.yaml").write_text("max_steps: 2\nbatch_size: 2\n")
    assert compose("tiny_smoke", ["trainer=tiny"], [dest]).trainer.batch_size == 2
    assert recipe_path("tiny_smoke", [dest]) == dest / "tiny_smoke.yaml"
    assert main(["init", "tiny_smoke", str(dest)]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err


def test_missing_config_dir_and_recipe_file_are_named(tmp_path, capsys):
    assert main(["validate", "tiny_smoke", "--config-dir", str(tmp_path / "nope")]) == 2
    assert "--config-dir" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_malformed_recipe_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - base_run\nstages: [\n  - {stage: distill\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "not valid YAML" in err


@pytest.mark.parametrize("override, message", [
    ("run_name=../../escape", "run_name"),
    ("stages.0.name=../../../victim", "stages[0].name"),
    ("recipe=a/b", "recipe"),
])
def test_names_that_would_leave_the_run_folder_are_refused(override, message, capsys):
    assert main(["validate", "tiny_smoke", override]) == 1
    out = capsys.readouterr().out
    assert message in out and "plain name" in out


def test_generate_flags_come_from_the_runtime_sampling_config():
    from codexmini.cli import build_parser
    from codexmini.runtime import SamplingConfig

    args = build_parser().parse_args(["generate", "m.cmx", "--prompt", "x"])
    for name in ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert getattr(args, name) == getattr(SamplingConfig(), name)
