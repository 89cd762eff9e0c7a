"""Issue 16, item 4: a finished stage is skipped only when its files still match the hashes its manifest records;
a truncated or bit-flipped `model.safetensors` is redone (not used by the next stages), and a damaged input
folder (`model.init=folder`) is an error naming the file."""

from __future__ import annotations

import json
import random

import pytest

from codexmini.errors import StageFailed
from codexmini.files import sha256_file
from codexmini.pipeline import load_model_folder
from tests.hardening.conftest import TINY, run_cli


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path, n=589):
    data = bytearray(path.read_bytes())
    rng = random.Random(16)
    for i in rng.sample(range(len(data) // 2, len(data)), n):  # in the weights, past the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_a_damaged_stage_output_is_redone_not_skipped(tiny_run, damage, capsys):
    out, run_dir = tiny_run
    weights = run_dir / "01-distill" / "model.safetensors"
    recorded = json.loads((run_dir / "01-distill" / "manifest.json").read_text())["outputs"]["model.safetensors"]
    damage(weights)
    assert sha256_file(weights) != recorded
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *TINY) == 0
    said = capsys.readouterr().out
    assert "01-distill: " in said and "does not match the hash its manifest records" in said
    assert "redoing the stage" in said and "01-distill: running distill" in said
    assert "00-init: student" not in said  # the student it was trained from is intact: not rebuilt
    # Redone to the same result (training is deterministic), and recorded as such.
    assert sha256_file(weights) == recorded
    assert json.loads((run_dir / "01-distill" / "manifest.json").read_text())["outputs"]["model.safetensors"] == \
        recorded


def test_a_damaged_init_output_is_rebuilt_and_the_next_stage_kept(tiny_run, capsys):
    out, run_dir = tiny_run
    _truncate(run_dir / "00-init" / "model.safetensors")
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *TINY) == 0
    said = capsys.readouterr().out
    assert "00-init: " in said and "building the student again" in said
    # The student is built to the same bytes, so the distill stage's recorded input still matches: it is kept.
    assert "01-distill: complete, skipped" in said


def test_a_missing_output_is_redone(tiny_run, capsys):
    out, run_dir = tiny_run
    (run_dir / "01-distill" / "config.json").unlink()
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *TINY) == 0
    said = capsys.readouterr().out
    assert "config.json is missing" in said and "01-distill: running distill" in said
    assert (run_dir / "01-distill" / "config.json").is_file()


@pytest.mark.parametrize("damage", [_truncate, lambda p: p.write_bytes(b"")], ids=["truncated", "empty"])
def test_a_damaged_init_folder_is_named_before_any_work(finished_run, tmp_path, damage, capsys):
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(finished_run[1] / "00-init", folder)
    weights = folder / "model.safetensors"
    damage(weights)
    out = tmp_path / "runs"
    args = ["tiny_smoke", f"output_dir={out}", "model.init=folder", f"model.path={folder}", *TINY]
    assert run_cli("validate", *args) == 1
    said = capsys.readouterr().out
    assert f"model.path: {weights} is truncated or damaged" in said
    assert run_cli("run", *args) == 2
    assert str(weights) in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(StageFailed, match=f"{weights} is truncated or damaged.*intact model folder"):
        load_model_folder(folder, "point model.path at an intact model folder")
