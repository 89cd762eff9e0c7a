"""scripts/bench_frontier.py: the `--points` parser, and a `--quick` run on the tiny random teacher (llama.cpp's
quantizer and codexmini's, each file scored by its own engine), when llama-cpp-python is installed."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_frontier.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_points_parse_to_quantize_config_overrides():
    bench = _script()
    assert bench.parse_point("int4_g32") == ("int4_g32", {"method": "gptq", "default": "int4_g32",
                                                          "embedding": "int8"})
    name, over = bench.parse_point("mix:target_mb=Q3_K_M,candidates=int3_g32+int4_g32,search=false,damp=0.02")
    assert name == "mix" and over == {"target_mb": "Q3_K_M", "candidates": ["int3_g32", "int4_g32"],
                                      "search": False, "damp": 0.02}
    assert bench.parse_point('j:{"default": "int8", "rules": []}') == ("j", {"default": "int8", "rules": []})
    with pytest.raises(SystemExit, match="unknown key"):
        bench.parse_point("bad:groupsize=32")
    with pytest.raises(SystemExit, match="not a default point"):
        bench.parse_point("int5")


@pytest.mark.slow
def test_quick_run_scores_both_engines(tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "frontier"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    domains = set(result["meta"]["teacher_ppl"])
    assert {"stdlib", "site_code"} <= domains or "stdlib" in domains
    for engine in ("llama.cpp", "codexmini"):
        mine = [r for r in rows if r["engine"] == engine]
        assert len(mine) >= 2, engine
        for r in mine:
            assert math.isfinite(r["mean_kl"]) and 0 <= r["mean_kl"] < 1, r
            assert r["mb"] > 0 and set(r["domains"]) == domains
            assert all(v > 0 for v in r["decode_tokens_per_s"].values())
    # the budget point was sized from the llama.cpp file measured in the same run: the whole .cmx within it
    budget = next(r for r in rows if r["type"] == "budget@Q4_0")
    q4_0 = next(r for r in rows if r["type"] == "Q4_0")
    assert budget["target_mb"] == q4_0["mb"] and budget["mb"] <= q4_0["mb"]
    assert "| engine | type | MB | mean KLD |" in proc.stdout
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
