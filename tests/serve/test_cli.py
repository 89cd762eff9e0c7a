"""`codexmini serve` as a process, its arguments, and what the serve package may import."""

from __future__ import annotations

import argparse
import ast
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from codexmini.serve.cli import add_parser, api_key, main, model_specs

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "codexmini" / "serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_specs(cmx_models, tmp_path):
    p = cmx_models["softmax"]
    assert model_specs([str(p), f"other={p}"]) == {"softmax": p, "other": p}
    with pytest.raises(ValueError, match="two models are named"):
        model_specs([str(p), f"softmax={p}"])
    with pytest.raises(ValueError, match="no such file"):
        model_specs([str(tmp_path / "nope.cmx")])
    with pytest.raises(ValueError, match="NAME=PATH"):
        model_specs([f"={p}"])


def test_the_subcommand_parses(cmx_models, tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    key = tmp_path / "key"
    key.write_text("abc\n")
    args = parser.parse_args(["serve", str(cmx_models["linear"]), "--api-key-file", str(key), "--parallel", "8"])
    assert args.parallel == 8 and args.host == "127.0.0.1" and args.port == 8000 and api_key(args) == "abc"
    with pytest.raises(SystemExit):  # one key source only
        parser.parse_args(["serve", "m.cmx", "--api-key", "a", "--api-key-file", str(key)])
    key.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        api_key(parser.parse_args(["serve", "m.cmx", "--api-key-file", str(key)]))
    assert parser.parse_args(["serve", "m.cmx", "--kv-dtype", "float32"]).kv_dtype == "float32"
    assert parser.parse_args(["serve", "m.cmx"]).kv_dtype == "auto"


def test_bad_arguments_exit_with_a_message(cmx_models, capsys):
    assert main([str(cmx_models["linear"]), "--parallel", "0"]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(cmx_models["linear"]), "--kv-dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--kv-dtype" in err and "'bfloat16'" in err and "float16" in err


def _serve(args, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "codexmini.serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(120)
def test_python_m_codexmini_serve(cmx_models):
    port = free_port()
    proc = _serve([f"coder={cmx_models['hybrid']}", "--port", str(port), "--api-key", "k", "--log-level", "warning"])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        from openai import OpenAI

        out = OpenAI(base_url=url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="coder", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert out.model == "coder" and out.usage.prompt_tokens > 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, -signal.SIGINT)  # uvicorn re-raises the signal once it has shut down


@pytest.mark.timeout(120)
def test_a_model_that_fails_to_load_stops_the_process(tmp_path):
    bad = tmp_path / "bad.cmx"
    bad.write_bytes(b"\x00" * 64)
    proc = _serve([str(bad), "--port", str(free_port()), "--log-level", "error"])
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 1 and "bad.cmx" in out


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "codexmini.serve" if node.level == 1 else "codexmini"
                yield f"{base}.{node.module}" if node.module else base
            else:
                yield node.module


def test_serve_imports_the_runtime_and_its_web_stack_only():
    allowed = {"fastapi", "starlette", "uvicorn", "anyio", "jinja2", "torch", "codexmini.runtime",
               "codexmini.serve"}
    bad = []
    for path in sorted(SERVE.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.name}: {name}")
    assert bad == []


def test_importing_the_server_loads_no_training_stack():
    code = ("import sys, codexmini.serve.app, codexmini.serve.cli; "
            "print(sorted(m for m in ('transformers', 'hydra', 'omegaconf', 'accelerate', 'datasets', "
            "'codexmini.models', 'codexmini.train', 'codexmini.distill') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
