"""Every error in OpenAI's shape and status, and none of them hurts the server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.conftest import LiveServer

MSG = [{"role": "user", "content": "hi"}]


def post(server, path, body=None, raw=None, headers=None):
    return httpx.post(server.url + path, json=body, content=raw, headers=headers, timeout=30)


def assert_error(r, status, param=None, code=None, says=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if says is not None:
        assert says in err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_400(server, raw):
    assert_error(post(server, "/v1/chat/completions", raw=raw, headers={"content-type": "application/json"}), 400,
                 code="invalid_json")


@pytest.mark.parametrize("field, value, param", [
    ("temperature", 5, "temperature"), ("temperature", "hot", "temperature"), ("top_p", 0, "top_p"),
    ("max_tokens", -1, "max_tokens"), ("max_tokens", 2.5, "max_tokens"), ("stop", [1], "stop"),
    ("top_logprobs", 3, "top_logprobs"), ("logprobs", "yes", "logprobs"), ("stream", 1, "stream"),
    ("messages", [], "messages"), ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]"),
    ("logit_bias", {"99999": 1}, "logit_bias"), ("model", 3, "model"), ("seed", "x", "seed"),
])
def test_bad_parameter_values_are_named(server, field, value, param):
    body = {"model": "softmax", "messages": MSG, "max_tokens": 2, field: value}
    assert_error(post(server, "/v1/chat/completions", body), 400, param=param)


@pytest.mark.parametrize("field, value", [("n", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("tool_choice", "required"), ("response_format", {"type": "json_object"})])
def test_unsupported_fields_are_refused_clearly(server, field, value):
    r = post(server, "/v1/chat/completions", {"model": "softmax", "messages": MSG, field: value})
    assert_error(r, 400, param=field, code="unsupported_parameter", says="not supported")


def test_unknown_fields_are_ignored_and_neutral_values_accepted(server):
    r = post(server, "/v1/chat/completions", {"model": "softmax", "messages": MSG, "max_tokens": 2, "n": 1,
                                              "tools": [], "user": "u", "frobnicate": {"x": 1}, "store": False})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="nope", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nope")


def test_prompt_longer_than_the_context_is_400(server):
    long = "hello world " * 3000  # > 4096 tokens
    for path, body in (("/v1/completions", {"prompt": long}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})):
        assert_error(post(server, path, {"model": "linear", **body}), 400, code="context_length_exceeded",
                     says="maximum context length is 4096")
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="linear", prompt=long)


def test_completion_prompt_forms(server):
    ok = post(server, "/v1/completions", {"model": "softmax", "prompt": [5, 6, 7], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3
    assert_error(post(server, "/v1/completions", {"model": "softmax", "prompt": ["a", "b"]}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {"model": "softmax", "prompt": [5, 100000]}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {"model": "softmax"}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {"model": "softmax", "prompt": "x", "echo": True}), 400,
                 param="echo")
    assert_error(post(server, "/v1/completions", {"model": "softmax", "prompt": ""}), 400, code="empty_prompt")


def test_unknown_paths_and_methods(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_api_key(cmx_models, tmp_path):
    with LiveServer({"softmax": cmx_models["softmax"]}, api_key="sekrit") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "softmax", "messages": MSG})
        assert_error(r, 401, code="invalid_api_key")
        assert_error(httpx.get(s.url + "/metrics"), 401)
        assert httpx.get(s.url + "/health").status_code == 200  # for load balancers: says nothing about content
        out = s.client(api_key="sekrit").chat.completions.create(model="softmax", messages=MSG, max_tokens=2)
        assert out.choices[0].message.role == "assistant"


def test_a_full_queue_answers_503_with_retry_after(cmx_models):
    with LiveServer({"linear": cmx_models["linear"]}, parallel=1, max_queue=1) as s:
        s.slow_down("linear", 0.01)
        body = {"model": "linear", "prompt": "hello", "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", s.url + "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # kept: dropping the iterator would close the connection
                next(lines)  # it holds the one slot now
                with c2.stream("POST", s.url + "/v1/completions", json=body) as waiting:  # the one queue place
                    assert waiting.status_code == 200 and s.state.models["linear"].engine.load() == (1, 1)
                    r = post(s, "/v1/completions", {**body, "stream": False})
                    assert_error(r, 503, code="overloaded")
                    assert r.headers["retry-after"] == "1"
        assert s.metric("codexmini_requests_rejected_total", model="linear") == 1


def test_the_server_survives_the_errors(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    out = server.client().chat.completions.create(model="softmax", messages=MSG, max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_template_that_reaches_python_internals_is_refused(evil_model):
    path, marker = evil_model
    with LiveServer({"evil": path}) as s:
        r = post(s, "/v1/chat/completions", {"model": "evil", "messages": MSG, "max_tokens": 2})
        assert_error(r, 500, code="chat_template_refused", says="not allowed")
        assert not marker.exists()
        ok = s.client().completions.create(model="evil", prompt="def", max_tokens=2)  # the model itself serves
        assert ok.choices[0].finish_reason in ("stop", "length")
        source = s.state.models["evil"].rt.chat_template
    import jinja2

    jinja2.Environment().from_string(source).render(messages=MSG)  # what it does outside the sandbox
    assert marker.exists()


def test_health_is_503_while_loading(cmx_models):
    import asyncio

    from codexmini.serve.app import build_app

    app = build_app({"softmax": cmx_models["softmax"]}, load=False)

    async def get(path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get(path)

    r = asyncio.run(get("/health"))
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = asyncio.run(get("/v1/models"))
    assert_error(r, 503, code="not_ready")
    assert r.headers["retry-after"] == "1"
    app.state.server.load()
    try:
        assert asyncio.run(get("/health")).json() == {"status": "ok", "models": ["softmax"]}
        assert asyncio.run(get("/v1/models")).json()["data"][0]["id"] == "softmax"
    finally:
        app.state.server.close()


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    from codexmini.serve.app import build_app

    bad = tmp_path / "bad.cmx"
    bad.write_bytes(b"not a cmx file")
    app = build_app({"bad": bad}, load=False)
    app.state.server.load()
    assert app.state.server.state == "failed" and "bad.cmx" in app.state.server.error


def test_internal_failures_are_a_plain_500_and_the_server_goes_on(cmx_models):
    with LiveServer({"softmax": cmx_models["softmax"]}) as s:
        served = s.state.models["softmax"]
        encode, step = served.encode, served.rt.decode_batch

        def broken(*a):
            raise RuntimeError("secret detail")

        served.encode = broken
        r = post(s, "/v1/completions", {"model": "softmax", "prompt": "hi", "max_tokens": 3})
        assert_error(r, 500)
        assert "secret detail" not in r.text
        served.encode = encode
        served.rt.decode_batch = broken  # the engine's step fails: the request hears, the engine goes on
        r = post(s, "/v1/completions", {"model": "softmax", "prompt": "hi", "max_tokens": 3})
        assert_error(r, 500, code="generation_failed")
        assert "secret detail" not in r.text
        with httpx.stream("POST", s.url + "/v1/completions", json={"model": "softmax", "prompt": "hi",
                                                                    "max_tokens": 3, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert '"generation_failed"' in lines[-2] and lines[-1] == "data: [DONE]"
        served.rt.decode_batch = step
        # (ignore_eos: whether this tiny random model picks its end token first is not what is tested)
        assert s.client().completions.create(model="softmax", prompt="hi", max_tokens=3,
                                             extra_body={"ignore_eos": True}).usage.completion_tokens == 3
        assert post(s, "/v1/completions", raw=b"[" * 100000, headers={"content-type": "application/json"}
                    ).status_code == 400
