"""Tiny .cmx models (softmax, linear, hybrid) with a tokenizer and a chat template, and live servers on loopback
ports for the official `openai` client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.conftest import CODE, tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
# Both kinds of state in each model that has a linear layer: the prefix cache must handle the mix.
LAYERS = {"softmax": dict(layer_types=["softmax", "softmax"]),
          "linear": dict(layer_types=["linear", "linear"], linear_decay=True),
          "hybrid": dict(layer_types=["softmax", "hybrid"], feature_map="hedgehog", linear_decay=True)}


def make_model(**kw):
    return tiny_model(**{"max_position_embeddings": 4096, **kw})


@pytest.fixture(scope="session")
def serve_tokenizer():
    """Its own tiny BPE (not the shared fixture: this one carries a chat template)."""
    from codexmini.data import train_bpe_tokenizer

    chat = "<|bos|>system\nYou are a helpful assistant.<|eos|>\n<|bos|>user\nWrite a function.<|eos|>\n"
    tok = train_bpe_tokenizer([CODE * 3, "hello world, the quick brown fox", chat] * 10, vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def cmx_models(tmp_path_factory, serve_tokenizer) -> dict:
    """{"softmax" | "linear" | "hybrid": path to a tiny .cmx file with the chat template}."""
    from codexmini.export.to_cmx import export_cmx

    folder = tmp_path_factory.mktemp("serve_models")
    return {name: export_cmx(make_model(**kw), serve_tokenizer, folder / f"{name}.cmx") for name, kw in LAYERS.items()}


@pytest.fixture(scope="session")
def evil_model(tmp_path_factory, serve_tokenizer):
    """A model whose chat template tries to reach Python internals (and, through them, to write a file)."""
    import copy

    from codexmini.export.to_cmx import export_cmx

    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "pwned"
    tok = copy.deepcopy(serve_tokenizer)
    # the classic template injection: from a global's function to its module's `os`, then a file is created
    tok.chat_template = (f"{{{{ cycler.__init__.__globals__.os.open('{marker}', 65) }}}}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    return export_cmx(make_model(**LAYERS["softmax"]), tok, folder / "evil.cmx"), marker


class LiveServer:
    """`codexmini.serve` on uvicorn in a thread, on a free loopback port."""

    def __init__(self, models: dict, **config):
        import uvicorn

        from codexmini.serve.app import build_app
        from codexmini.serve.config import ServeConfig

        self.app = build_app(models, ServeConfig(**config))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"the server did not become healthy: {self.app.state.server.error}")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.server

    def client(self, api_key: str = "none", **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=kw.pop("timeout", 60), **kw)

    def slow_down(self, model: str, seconds: float) -> None:
        """Make each decode step of `model` take at least `seconds` more, so that a long request surely lasts
        while the test acts (the tiny models decode thousands of tokens a second)."""
        rt = self.state.models[model].rt
        step = rt.decode_batch

        def slow(ids, sessions):
            time.sleep(seconds)
            return step(ids, sessions)

        rt.decode_batch = slow

    def metric(self, name: str, **labels) -> float:
        return self.state.metrics.get(name, **labels)


@pytest.fixture(scope="session")
def server(cmx_models):
    """The three tiny models on one server (prefix cache on, small checkpoint blocks so they are exercised)."""
    with LiveServer(cmx_models, parallel=4, prefill_chunk=16) as s:
        yield s


@pytest.fixture(scope="session")
def runtimes(cmx_models):
    """A Runtime per model: the reference the server's answers are checked against."""
    from codexmini.runtime import Runtime

    return {name: Runtime(path) for name, path in cmx_models.items()}
