"""The run report: the stage table, and the per-domain table and plot when a run measures several domains."""

import json

from codexmini.report import report


def _stage(run, name, metrics, model=True):
    folder = run / name
    folder.mkdir(parents=True)
    outputs = {"model.safetensors": "x"} if model else {}
    (folder / "manifest.json").write_text(json.dumps({"metrics": metrics, "outputs": outputs, "wall_time_s": 1.0}))


def test_report_shows_each_domain_against_the_teacher(tmp_path):
    run = tmp_path / "run"
    teacher = {"code": {"ppl": 10.0}, "prose": {"ppl": 20.0}}
    _stage(run, "00-init", {"val_ppl": 30.0, "parameters": 10, "file_bytes": 2 ** 20, "teacher_val_ppl": 12.0,
                            "teacher_domains": teacher,
                            "domains": {"code": {"ppl": 30.0, "kl": 1.5}, "prose": {"ppl": 80.0, "kl": 2.5}}})
    _stage(run, "01-distill", {"val_ppl": 15.0, "parameters": 10, "file_bytes": 2 ** 20,
                               "domains": {"code": {"ppl": 12.0, "kl": 0.25}, "prose": {"ppl": 50.0, "kl": 1.0}}})
    text = report(run)
    assert "code ppl/teacher" in text and "prose KL" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| 01-distill") and "1.20" in ln)
    assert "2.50" in line and "0.25" in line  # 12/10, 50/20, code KL
    assert "teacher ppl: code 10.00, prose 20.00" in text
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_single_domain_runs_have_no_domain_table(tmp_path):
    run = tmp_path / "run"
    _stage(run, "00-init", {"val_ppl": 30.0, "parameters": 10, "domains": {"all": {"ppl": 30.0, "kl": 1.0}}})
    assert "ppl/teacher" not in report(run)
