"""Issue 16, item 2: run, recipe and stage names are plain names, and the pipeline never deletes outside its run
folder (the issue's `stages.6.name=../../../../../victim`, run twice, removed a directory elsewhere)."""

from __future__ import annotations

import os
import shutil

import pytest

from codexmini.pipeline import _remove
from tests.hardening.conftest import TINY, run_cli


def _victim(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "precious.txt").write_text("keep me")
    return path


def test_the_issues_stage_name_traversal_leaves_the_victim_alone(tmp_path, capsys):
    out = tmp_path / "work" / "runs"
    run_dir = out / "tiny_smoke" / "trav"
    # Where the issue's stage folder name points: 07-../../../../../victim from the run folder.
    victim = _victim(run_dir.joinpath("07-..", "..", "..", "..", "..", "victim").resolve())
    assert not victim.is_relative_to(run_dir.resolve())
    args = ["tiny_smoke", f"output_dir={out}", "run_name=trav", "stages.6.name=../../../../../victim"]
    for _ in range(2):
        assert run_cli("run", *args) == 2
        assert "stages[6].name" in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not run_dir.exists()  # refused before any work


def test_a_run_name_that_leaves_the_output_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", "run_name=../../escape", *TINY) == 2
    assert "run_name" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and not out.exists()


def test_remove_refuses_paths_outside_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = _victim(tmp_path / "victim")
    for path in (tmp_path / "victim", run_dir / ".." / "victim", run_dir, tmp_path):
        with pytest.raises(ValueError, match="outside the run folder"):
            _remove(path, run_dir)
    os.symlink(victim, run_dir / "01-distill")  # a stage folder that is a link to somewhere else
    with pytest.raises(ValueError, match="outside the run folder"):
        _remove(run_dir / "01-distill", run_dir)
    assert (victim / "precious.txt").read_text() == "keep me"
    (run_dir / "02-prune").mkdir()
    _remove(run_dir / "02-prune", run_dir)
    assert not (run_dir / "02-prune").exists()


def test_a_stage_folder_linked_outside_the_run_is_not_emptied(tiny_run, tmp_path, capsys):
    out, run_dir = tiny_run
    victim = _victim(tmp_path / "victim")
    shutil.rmtree(run_dir / "01-distill")
    os.symlink(victim, run_dir / "01-distill")
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *TINY) == 2
    assert "outside the run folder" in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "keep me"
