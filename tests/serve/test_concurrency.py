"""Concurrent clients: batched decoding without cross-talk, disconnects, and the prefix cache across turns."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from codexmini.runtime import SamplingConfig
from codexmini.serve.prefix_cache import common_prefix, pack
from tests.serve.conftest import LiveServer
from tests.serve.test_server import chat_prompt

PROMPTS = ["def add(a, b):", "class Stack:", "hello world", "the quick brown fox", "    def push(self, x):",
           "return a + b", "self.items", "def pop(self):"]


def stream_text(client, model, prompt, max_tokens=24):
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(ch.choices[0].text for ch in out if ch.choices)


@pytest.mark.parametrize("model", ["softmax", "hybrid"])
def test_eight_concurrent_streams_equal_each_run_alone(cmx_models, model):
    with LiveServer({model: cmx_models[model]}, parallel=8, prefix_cache_mb=0) as s:
        c = s.client()
        alone = [stream_text(c, model, p) for p in PROMPTS]
        steps, rows = s.metric("codexmini_decode_steps_total", model=model), s.state.metrics
        barrier = threading.Barrier(len(PROMPTS))

        def run(p):
            barrier.wait()
            return stream_text(s.client(), model, p)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(run, PROMPTS))
        assert together == alone
        # they were decoded together: far fewer steps than tokens
        tokens = sum(len(s.state.models[model].rt.tokenizer.encode(t).ids) for t in together)
        assert s.metric("codexmini_decode_steps_total", model=model) - steps < 0.6 * tokens
        # and some steps had more than four of them (a histogram bucket count below the total)
        samples = dict(line.rsplit(" ", 1) for line in rows.render().splitlines() if not line.startswith("#"))
        assert float(samples[f'codexmini_decode_batch_size_bucket{{model="{model}",le="4"}}']) < \
            float(samples[f'codexmini_decode_batch_size_count{{model="{model}"}}'])


def test_concurrent_seeded_sampling_is_independent_of_the_batch(cmx_models):
    with LiveServer({"linear": cmx_models["linear"]}, parallel=4, prefix_cache_mb=0) as s:
        def run(i):
            return s.client().completions.create(model="linear", prompt=PROMPTS[i % 4], max_tokens=16,
                                                 temperature=0.9, seed=i).choices[0].text

        alone = [run(i) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(run, range(4))) == alone


def test_every_model_runs_on_one_engine_thread(cmx_models):
    """Two models served at once run on one worker thread (with a thread each, libgomp stopped spin-waiting once
    both had run parallel work, and decoding slowed 2.3x), and requests to both at once answer as each alone."""
    models = {k: cmx_models[k] for k in ("softmax", "linear")}
    with LiveServer(models, prefix_cache_mb=0) as s:
        c = s.client()
        alone = {m: stream_text(c, m, "def add(a, b):") for m in models}
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda m: (m, stream_text(s.client(), m, "def add(a, b):")), list(models) * 2))
        assert all(text == alone[m] for m, text in together)
        workers = {m.engine.worker for m in s.state.models.values()}
        assert workers == {s.state.worker} and s.state.worker._thread.is_alive()
    assert not s.state.worker._thread.is_alive()  # closing the server stops it


def test_a_disconnected_stream_frees_its_slot_at_once(cmx_models):
    with LiveServer({"linear": cmx_models["linear"]}, parallel=1) as s:
        s.slow_down("linear", 0.005)  # 4000 tokens would take 20 s or more
        body = {"model": "linear", "prompt": "hello", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", s.url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
            t0 = time.monotonic()  # the client has closed its connection
        out = s.client().completions.create(model="linear", prompt="class Stack:", max_tokens=4,
                                            extra_body={"ignore_eos": True})
        assert time.monotonic() - t0 < 5
        assert out.usage.completion_tokens == 4
        assert s.metric("codexmini_requests_cancelled_total", model="linear") == 1
        assert s.metric("codexmini_generation_tokens_total", model="linear") < 1000
        assert s.state.models["linear"].engine.load() == (0, 0)


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(cmx_models):
    with LiveServer({"linear": cmx_models["linear"]}, parallel=1) as s:
        s.slow_down("linear", 0.005)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"model": "linear", "prompt": "hello", "max_tokens": 4000,
                                                        "ignore_eos": True}, timeout=0.5)
        deadline = time.monotonic() + 5
        while s.state.models["linear"].engine.load() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.state.models["linear"].engine.load() == (0, 0)
        assert s.metric("codexmini_requests_cancelled_total", model="linear") == 1


@pytest.mark.parametrize("model", ["softmax", "linear", "hybrid"])
def test_second_chat_turn_reuses_the_first(server, runtimes, model):
    c, rt = server.client(), runtimes[model]
    system = {"role": "system", "content": "You are a helpful assistant. " * 8 + model}  # its own prefix
    turn1 = [system, {"role": "user", "content": "Write a function."}]
    first = c.chat.completions.create(model=model, messages=turn1, max_tokens=20, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Now a class."}]
    second = c.chat.completions.create(model=model, messages=turn2, max_tokens=20, temperature=0)
    ids = rt.tokenizer.encode(chat_prompt(rt, turn1), add_special_tokens=False).ids
    first_prompt = len(ids)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first turn reuses nothing of its own: at most the template's opening, which any chat the session's server
    # saw before shares (tests/serve/test_errors.py's, when it runs first)
    other = rt.tokenizer.encode(chat_prompt(rt, [{"role": "system", "content": "Q"}]), add_special_tokens=False).ids
    opening = common_prefix(pack(ids), pack(other))
    assert first.usage.prompt_tokens_details.cached_tokens <= opening < first_prompt // 2
    assert first_prompt <= cached < second.usage.prompt_tokens
    # the answer is the one computed from scratch
    assert second.choices[0].message.content == rt.generate(chat_prompt(rt, turn2), SamplingConfig(max_tokens=20))
    # the same prompt again: all of it from the cache, sampling starts at once from the cached logits
    again = c.chat.completions.create(model=model, messages=turn2, max_tokens=20, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens
    assert again.choices[0].message.content == second.choices[0].message.content


def test_linear_models_resume_from_block_checkpoints(server, runtimes):
    """A prompt that shares only part of a cached one (not at its end): a linear model resumes from the last
    checkpoint (every 16 tokens on this server) inside the shared part, a softmax one from the shared length."""
    c = server.client()
    base = "def add(a, b):\n    return a + b\n" * 6
    for model in ("linear", "softmax"):
        rt = runtimes[model]
        c.completions.create(model=model, prompt=base + model, max_tokens=1)
        other = base + "class Stack:"
        out = c.completions.create(model=model, prompt=other, max_tokens=12, temperature=0)
        shared = len(rt.tokenizer.encode(base, add_special_tokens=False).ids)
        cached = out.usage.prompt_tokens_details.cached_tokens
        if model == "linear":
            assert cached % 16 == 0 and shared - 16 < cached <= shared
        else:
            assert shared <= cached < out.usage.prompt_tokens
        assert out.choices[0].text == rt.generate(other, SamplingConfig(max_tokens=12))


def test_metrics_are_prometheus_text(server):
    server.client().completions.create(model="softmax", prompt="hello", max_tokens=3)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("codexmini_requests_total", "codexmini_generation_tokens_total", "codexmini_queue_depth",
                 "codexmini_time_to_first_token_seconds_bucket", "codexmini_prefix_cache_hits_total",
                 "codexmini_generation_tokens_per_second"):
        assert f"\n{name}" in text
    assert 'codexmini_requests_total{endpoint="/v1/completions",model="softmax",status="200"}' in text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])  # every sample has a number
