"""An OpenAI-compatible HTTP server over the on-device runtime (`codexmini serve`).

    app.py           the FastAPI app: endpoints, auth, errors, streaming (`build_app`)
    config.py        `ServeConfig`: parallel slots, queue size, prefix-cache memory, prefill chunk, kernels, key
    engine.py        one thread per model: bounded queue, continuous batching, sampling, cancellation
    prefix_cache.py  reuse of earlier requests' prefixes (KV cut back; linear states from checkpoints), LRU
    protocol.py      OpenAI request bodies checked field by field; response objects
    templates.py     the model's chat template in a Jinja sandbox
    tokens.py        incremental detokenization with stop strings; token bytes for logprobs
    metrics.py       Prometheus text
    errors.py        OpenAI's error JSON
    cli.py           the `serve` subcommand (uvicorn)

It imports the runtime and its web stack (FastAPI, uvicorn, jinja2), never the training stack.
"""

from __future__ import annotations

from .config import ServeConfig


def build_app(*args, **kwargs):
    """See `codexmini.serve.app.build_app` (imported on use: FastAPI is the `serve` extra)."""
    from .app import build_app as build

    return build(*args, **kwargs)


__all__ = ["ServeConfig", "build_app"]
