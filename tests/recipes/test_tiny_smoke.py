"""tiny_smoke through the real CLI entry point, in-process; then kill a run mid-stage and resume it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codexmini.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    t0 = time.perf_counter()
    assert main(["run", "tiny_smoke", f"output_dir={out}"]) == 0
    return out / "tiny_smoke" / "default", time.perf_counter() - t0


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_tiny_smoke_writes_complete_stages_with_manifests(smoke_run):
    run_dir, seconds = smoke_run
    assert seconds < 120
    stages = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert stages == ["00-init", "01-transfer", "02-distill", "03-prune", "04-heal", "05-quantize", "06-export",
                      "07-eval", "08-generate"]
    init, transferred, distilled, pruned, healed = (_manifest(run_dir / s) for s in stages[:5])
    for m in (init, transferred, distilled, pruned, healed):
        assert set(m) >= {"stage", "key", "config", "metrics", "outputs", "versions", "wall_time_s"}
        assert m["metrics"]["val_ppl"] > 1
    # Models are HF folders chained by hash: each stage's input is the previous stage's output.
    assert transferred["inputs"]["sha256"] == init["outputs"]["model.safetensors"]
    assert distilled["inputs"]["sha256"] == transferred["outputs"]["model.safetensors"]
    assert pruned["inputs"]["sha256"] == distilled["outputs"]["model.safetensors"]
    assert healed["inputs"]["sha256"] == pruned["outputs"]["model.safetensors"]
    assert (run_dir / "04-heal" / "config.json").is_file() and (run_dir / "04-heal" / "tokenizer.json").is_file()
    # Pruning: fewer parameters, sizes written into the config, perplexity before and after recorded.
    p = pruned["metrics"]
    assert p["parameters"] < distilled["metrics"]["parameters"] == p["prune"]["params_before"]
    assert p["prune"]["params_after"] == p["parameters"] and p["prune"]["criterion"] == "taylor"
    assert p["val_ppl_before"] == pytest.approx(distilled["metrics"]["val_ppl"], rel=1e-4)
    saved = json.loads((run_dir / "03-prune" / "config.json").read_text())
    assert saved["layer_intermediate_sizes"] == p["prune"]["sizes"]["layer_intermediate_sizes"] == [96, 96, 96]
    assert saved["layer_num_attention_heads"] == [2, 2, 2]
    assert not (run_dir / "02-distill" / "checkpoints").exists()
    # Attention transfer lowered the linearized layers' error against softmax attention.
    before, after = (transferred["metrics"][k] for k in ("transfer_mse_before", "transfer_mse_after"))
    assert sum(after.values()) < sum(before.values())
    # Distillation moved the student towards the teacher.
    assert healed["metrics"]["val_ppl"] < init["metrics"]["val_ppl"]
    assert healed["config"]["trainer"]["max_steps"] == 6  # the per-stage override
    # QAT heal: trained through the int4 grid; then GPTQ int4 on every linear layer, the tied table (the head) int8.
    assert healed["config"]["distill"]["fake_quant"] and "quantize" in healed["config"]
    assert healed["metrics"]["val_ppl_fake_quant"] > 1
    q = _manifest(run_dir / "05-quantize")
    assert q["metrics"]["scheme_counts"] == {"int4_g32": 21, "int8": 1} and q["metrics"]["quantize"]["method"] == "gptq"
    assert q["metrics"]["quantize"]["schemes"]["model.embed_tokens"] == "int8"
    assert "lm_head" not in q["metrics"]["quantize"]["schemes"]
    assert q["metrics"]["val_ppl_before"] == pytest.approx(healed["metrics"]["val_ppl"], rel=1e-4)
    assert q["metrics"]["val_ppl"] == pytest.approx(healed["metrics"]["val_ppl_fake_quant"], rel=0.05)
    assert q["metrics"]["file_bytes"] < 0.6 * healed["metrics"]["file_bytes"]
    saved = json.loads((run_dir / "05-quantize" / "config.json").read_text())
    # The head is still the table, stored once (quantized): no more weights than the float model.
    assert saved["tie_word_embeddings"]
    assert q["metrics"]["parameters"] == healed["metrics"]["parameters"]
    assert saved["quantization_scheme"]["model.layers.0.mlp.down_proj"] == "int4_g32"
    # Export: one .cmx file the runtime loads, computing what PyTorch computes, with a sample and its speed.
    e = _manifest(run_dir / "06-export")["metrics"]
    # The same tensors as the quantized folder, plus the tokenizer and config in the metadata.
    tokenizer_bytes = (run_dir / "05-quantize" / "tokenizer.json").stat().st_size
    assert (run_dir / "06-export" / "model.cmx").stat().st_size == e["file_bytes"] < \
        q["metrics"]["file_bytes"] + tokenizer_bytes + 32 * 1024
    assert e["runtime_max_abs_logit_diff"] < 1e-3 and e["runtime_tokens_per_s"] > 1
    assert isinstance(e["sample"], str) and e["val_ppl"] == pytest.approx(q["metrics"]["val_ppl"])
    sample = _manifest(run_dir / "08-generate")["metrics"]["sample"]
    assert isinstance(sample, str)


def test_report_table_and_plot(smoke_run, capsys):
    run_dir, _ = smoke_run
    assert main(["report", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "04-heal" in text and "03-prune" in text and "06-export" in text and "val ppl" in text and "teacher val ppl" in text
    png = run_dir / "report.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_complete_stages(smoke_run, capsys):
    run_dir, _ = smoke_run
    before = _manifest(run_dir / "04-heal")["completed_at"]
    assert main(["run", "tiny_smoke", f"output_dir={run_dir.parents[1]}"]) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 8
    assert _manifest(run_dir / "04-heal")["completed_at"] == before


def test_changed_config_reruns_only_what_depends_on_it(smoke_run, capsys):
    run_dir, _ = smoke_run
    assert main(["run", "tiny_smoke", f"output_dir={run_dir.parents[1]}", "generate.max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    # The prompt length feeds the export stage's runtime sample and the generate stage; nothing before them reruns.
    assert "08-generate: running generate" in out and "06-export: running export" in out
    assert "05-quantize: complete, skipped" in out


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    overrides = ["trainer.max_steps=40", "trainer.checkpoint_every=5", "stages=[{stage: distill}]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "codexmini.cli", "run", "tiny_smoke", f"output_dir={tmp_path / 'a'}", *overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    ckpt = tmp_path / "a" / "tiny_smoke" / "default" / "01-distill" / "checkpoints" / "step_10" / "state.json"
    deadline = time.time() + 180
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stage = tmp_path / "a" / "tiny_smoke" / "default" / "01-distill"
    assert not (stage / "manifest.json").exists()  # never looks complete when it is not
    assert main(["run", "tiny_smoke", f"output_dir={tmp_path / 'a'}", *overrides]) == 0
    resumed = _manifest(stage)
    assert resumed["metrics"]["resumed_from"] >= 10
    assert main(["run", "tiny_smoke", f"output_dir={tmp_path / 'b'}", *overrides]) == 0
    clean = _manifest(tmp_path / "b" / "tiny_smoke" / "default" / "01-distill")
    assert clean["metrics"]["resumed_from"] == 0
    assert resumed["metrics"]["val_ppl"] == pytest.approx(clean["metrics"]["val_ppl"], rel=1e-5)
    assert resumed["outputs"]["model.safetensors"] == clean["outputs"]["model.safetensors"] or \
        resumed["metrics"]["val_loss"] == pytest.approx(clean["metrics"]["val_loss"], rel=1e-6)


def test_cli_reports_bad_input_without_traceback(capsys):
    assert main(["run", "quickstrat"]) == 2
    assert "Did you mean: quickstart" in capsys.readouterr().err
    assert main(["validate", "tiny_smoke", "trainer.max_steps=abc"]) == 2
    assert "trainer.max_steps" in capsys.readouterr().err


def test_single_stage_command_on_a_model_folder(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    assert main(["eval", str(run_dir / "04-heal"), "--recipe", "tiny_smoke", f"output_dir={tmp_path}"]) == 0
    m = _manifest(tmp_path / "eval" / "default" / "01-eval")
    assert m["metrics"]["val_ppl"] == pytest.approx(_manifest(run_dir / "04-heal")["metrics"]["val_ppl"], rel=1e-4)


def test_single_prune_stage_on_a_model_folder(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    assert main(["prune", str(run_dir / "04-heal"), "--recipe", "tiny_smoke", f"output_dir={tmp_path}",
                 "prune.mlp=0.5", "prune.heads=0", "prune.criterion=wanda"]) == 0
    m = _manifest(tmp_path / "prune" / "default" / "01-prune")
    assert m["metrics"]["prune"]["sizes"]["layer_intermediate_sizes"] == [48, 48, 48]
    assert main(["prune", str(run_dir / "04-heal"), "--recipe", "tiny_smoke", f"output_dir={tmp_path}",
                 "prune.mlp=1.5"]) == 2


def test_cli_generate_and_bench_on_the_exported_file(smoke_run, capsys):
    run_dir, _ = smoke_run
    cmx = str(run_dir / "06-export" / "model.cmx")
    assert main(["generate", cmx, "--prompt", "def add(", "--max-tokens", "8", "--temperature", "0.7",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def add(")
    assert main(["bench", cmx, "--contexts", "8,64", "--decode-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "| 8 |" in out and "| 64 |" in out and "decode tok/s" in out
    assert main(["generate", cmx]) == 2  # no --prompt: a clear error


def test_size_budget_through_the_quantize_and_export_commands(smoke_run, tmp_path, capsys):
    """`quantize=budget`: the file the export writes fits `quantize.target_mb` (tokenizer and header included),
    the manifest shows the allocation, the report the schemes."""
    run_dir, _ = smoke_run
    heal = run_dir / "04-heal"
    target = (heal / "model.safetensors").stat().st_size / 2 / 1e6  # the fp16 size: room for the tiny header
    assert main(["quantize", str(heal), "--recipe", "tiny_smoke", f"output_dir={tmp_path}", "quantize=budget",
                 f"quantize.target_mb={target}"]) == 0
    q = tmp_path / "quantize" / "default" / "01-quantize"
    alloc = _manifest(q)["metrics"]["quantize"]["allocation"]
    assert alloc["quantized_mb"] <= alloc["budget_mb"] and sum(alloc["counts"].values()) > 1
    assert main(["export", str(q), "--recipe", "tiny_smoke", f"output_dir={tmp_path}"]) == 0
    cmx = next((tmp_path / "export").rglob("model.cmx"))
    assert cmx.stat().st_size <= target * 1e6
    capsys.readouterr()
    assert main(["report", str(tmp_path / "quantize" / "default")]) == 0
    assert "schemes of 01-quantize:" in capsys.readouterr().out
