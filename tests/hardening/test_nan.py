"""Issue 16, item 3: bad values never ship a broken model with exit code 0. `distill.temperature=0` is refused
before any work; non-finite values that no config check can see (the weights themselves) fail the stage that
meets them, nothing after it is marked complete, and no `.cmx` file is left."""

from __future__ import annotations

import json
import math

import torch

from codexmini import CodexMiniForCausalLM
from tests.hardening.conftest import TINY, run_cli


def _manifests(out):
    return sorted(p.parent.name for p in out.rglob("manifest.json"))


def _student_folder(finished_run, dest, change):
    """The finished run's initial student, with `change(model)` applied to its weights, saved as a folder."""
    from transformers import AutoTokenizer

    src = finished_run[1] / "00-init"
    model = CodexMiniForCausalLM.from_pretrained(src)
    with torch.no_grad():
        change(model)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def test_temperature_zero_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run_cli("validate", "tiny_smoke", "distill.temperature=0") == 1
    assert "distill.temperature must be > 0" in capsys.readouterr().out
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", "distill.temperature=0", "quantize.method=rtn",
                   *TINY) == 2
    assert "distill.temperature" in capsys.readouterr().err
    assert not out.exists()


def test_nan_weights_fail_the_first_stage_and_nothing_ships(finished_run, tmp_path, capsys):
    folder = _student_folder(finished_run, tmp_path / "nan_student",
                             lambda m: m.model.layers[0].mlp.down_proj.weight[0, 0].fill_(float("nan")))
    out = tmp_path / "runs"
    args = ["tiny_smoke", f"output_dir={out}", "teacher.pretrain_steps=0", "model.init=folder",
            f"model.path={folder}", "trainer.max_steps=2", "quantize.method=rtn",
            "stages=[{stage: distill}, {stage: quantize}, {stage: export}]"]
    assert run_cli("validate", *args) == 0  # nothing a config check can see
    assert run_cli("run", *args) == 2
    err = capsys.readouterr().err
    assert "00-init: val_ppl = nan" in err and "not marked complete" in err
    assert _manifests(out) == []
    assert not list(out.rglob("*.cmx"))


def test_a_runtime_check_that_fails_keeps_no_cmx(finished_run, tmp_path, capsys):
    """Weights finite in fp32 but past fp16's range: PyTorch's perplexity is finite, the fp16 file's logits are not;
    the export refuses the file and the stage after it never runs."""
    folder = _student_folder(finished_run, tmp_path / "big_student",
                             lambda m: m.model.layers[0].mlp.down_proj.weight[:, 0].fill_(1e6))
    out = tmp_path / "runs"
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", "teacher.pretrain_steps=0", "model.init=folder",
                   f"model.path={folder}", "export.dtype=float16", "stages=[{stage: export}, {stage: eval}]") == 2
    err = capsys.readouterr().err
    assert "export: the runtime check failed" in err and "was not kept" in err
    run_dir = out / "tiny_smoke" / "default"
    init = json.loads((run_dir / "00-init" / "manifest.json").read_text())
    assert math.isfinite(init["metrics"]["val_ppl"])  # PyTorch computes finite values
    assert _manifests(out) == ["00-init"]
    assert not list(out.rglob("*.cmx")) and not (run_dir / "02-eval").exists()


def test_a_stage_that_trains_to_nan_is_not_marked_complete(tmp_path, capsys):
    """A learning rate that passes every check (finite, positive) but blows the weights up: the stage fails with
    its metrics named, and neither it nor the stage after it is marked complete."""
    out = tmp_path / "runs"
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", "teacher.pretrain_steps=0", "trainer.max_steps=3",
                   "trainer.warmup_steps=0", "trainer.lr=1e30", "stages=[{stage: distill}, {stage: eval}]") == 2
    err = capsys.readouterr().err
    assert "01-distill: val_ppl = " in err and "diverged" in err
    assert _manifests(out) == ["00-init"]
