"""scripts/bench_serve.py's load-test client (a lean HTTP/1.1 reader of server-sent events) against a live server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_serve  # noqa: E402


def test_the_load_test_client_counts_what_the_server_streams(server):
    """Two streamed completions on one keep-alive connection count the tokens the server's usage reports (the same
    as a non-streamed request's), with a gap per token after the first; an error status is raised with its body, and
    the connection still serves the next request."""
    body = {"model": "softmax", "prompt": "def add(a, b):", "max_tokens": 7, "temperature": 0}
    want = server.client().completions.create(**body).usage.completion_tokens

    async def run():
        async with bench_serve.Connection(server.url) as conn:
            first = await bench_serve.stream_request(conn, "/v1/completions", body)
            with pytest.raises(RuntimeError, match="404.*does not exist"):
                async for _ in conn.events("/v1/completions", {**body, "model": "nope"}):
                    pass
            second = await bench_serve.stream_request(conn, "/v1/completions", body)
        return first, second

    first, second = asyncio.run(run())
    assert first["tokens"] == second["tokens"] == want > 0
    assert len(first["gaps"]) <= want - 1 and first["ttft"] > 0
