"""The server against the official `openai` client, on a live loopback port."""

from __future__ import annotations

import pytest

from codexmini.runtime import SamplingConfig

PROMPT = "def add(a, b):"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a function."}]


def chat_prompt(rt, messages):
    from codexmini.serve.templates import ChatTemplate

    return ChatTemplate(rt.chat_template).render(messages)


def test_list_models(server):
    c = server.client()
    assert sorted(m.id for m in c.models.list().data) == ["hybrid", "linear", "softmax"]
    assert c.models.retrieve("linear").id == "linear"


@pytest.mark.parametrize("name", ["softmax", "linear", "hybrid"])
def test_completion_equals_the_runtime(server, runtimes, name):
    rt = runtimes[name]
    out = server.client().completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    choice = out.choices[0]
    assert choice.text == rt.generate(PROMPT, SamplingConfig(max_tokens=12))
    assert out.usage.prompt_tokens == len(rt.tokenizer.encode(PROMPT, add_special_tokens=False).ids)
    assert out.usage.completion_tokens == len(choice.logprobs.tokens)
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12


@pytest.mark.parametrize("name", ["softmax", "hybrid"])
def test_chat_completion_uses_the_template(server, runtimes, name):
    rt = runtimes[name]
    out = server.client().chat.completions.create(model=name, messages=MESSAGES, max_tokens=12, temperature=0)
    prompt = chat_prompt(rt, MESSAGES)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == rt.generate(prompt, SamplingConfig(max_tokens=12))
    assert out.usage.prompt_tokens == len(rt.tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert out.object == "chat.completion" and out.system_fingerprint.startswith("cmx-")


@pytest.mark.parametrize("name", ["softmax", "linear"])
def test_streamed_chat_joins_to_the_whole_answer(server, name):
    c = server.client()
    msgs = MESSAGES + [{"role": "user", "content": f"Again, for {name}."}]
    whole = c.chat.completions.create(model=name, messages=msgs, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_ends_with_done(server):
    import httpx

    body = {"model": "softmax", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_logprobs_of_the_chosen_tokens(server):
    out = server.client().chat.completions.create(model="hybrid", messages=MESSAGES, max_tokens=8, temperature=0,
                                                  logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == out.choices[0].message.content


def test_stop_string_cuts_the_answer(server):
    c = server.client()
    free = c.completions.create(model="softmax", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert len(free) > 6
    stop = free[3:6]
    cut = c.completions.create(model="softmax", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(server):
    c = server.client()
    runs = [c.completions.create(model="linear", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9,
                                 seed=123, extra_body={"top_k": 50}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]
