"""The HTTP side: a FastAPI app with OpenAI's endpoints over one engine per model.

    GET  /v1/models, /v1/models/{name}     the served models
    POST /v1/completions                   text completion (prompt: a string or token ids)
    POST /v1/chat/completions              chat, through the model's own chat template (sandboxed)
    GET  /health                           200 when every model is loaded, 503 while loading (or failed)
    GET  /metrics                          Prometheus text

`build_app` is the entry point (the CLI wraps it in uvicorn). The handlers check the request, tokenize it (in a
worker thread: a long prompt does not hold up the event loop), hand it to the model's engine and turn its events
into one JSON response or a stream of server-sent events ending with `data: [DONE]`. A client that disconnects,
streaming or not, cancels its generation at once, freeing its slot. Every error is OpenAI's error JSON with its
status; an unexpected one is logged and answered with a plain 500, never a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response

from .config import ServeConfig
from .engine import Delta, Engine, Failure, Finish, Job, QueueFull, Worker
from .errors import ApiError, error_body, sse_error
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .protocol import (GenParams, chat_logprobs, completion_logprobs, new_id, now, parse_chat, parse_completion,
                       requested_model, usage)
from .templates import ChatTemplate, TemplateError

log = logging.getLogger("codexmini.serve")
MAX_BODY = 16 << 20  # bytes of request JSON: far more than any context, far less than a memory problem


@dataclass
class ServedModel:
    name: str
    path: Path
    rt: object
    engine: Engine
    context: int
    created: int
    template: ChatTemplate | None = None
    template_problem: str | None = None  # why chat is unavailable, when it is

    def encode(self, text: str) -> list[int]:
        return self.rt.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def vocab_size(self) -> int:
        return int(self.rt.config["vocab_size"])


@dataclass
class Server:
    """What the app serves: the model files, and once loaded, the models and their engines."""

    specs: dict[str, Path]
    config: ServeConfig
    metrics: Metrics = field(default_factory=Metrics)
    models: dict[str, ServedModel] = field(default_factory=dict)
    state: str = "loading"  # loading | ready | failed | stopped
    error: str | None = None
    on_failure: Callable[[], None] | None = None
    worker: Worker = field(default_factory=Worker)  # one thread runs every model's engine (see `Worker`)

    def load(self) -> None:
        """Load every model and start its engine (the app runs this in a thread at startup)."""
        from ..runtime import Runtime

        try:
            for name, path in self.specs.items():
                t0 = time.perf_counter()
                rt = Runtime(path, kernels=self.config.kernels, threads=self.config.threads,
                             kv_dtype=self.config.kv_dtype)
                cache = PrefixCache(rt, int(self.config.prefix_cache_mb * (1 << 20)), self.config.prefill_chunk) \
                    if self.config.prefix_cache_mb > 0 else None
                engine = Engine(name, rt, parallel=self.config.parallel, max_queue=self.config.max_queue,
                                cache=cache, metrics=self.metrics, prefill_chunk=self.config.prefill_chunk,
                                worker=self.worker)
                served = ServedModel(name, path, rt, engine, int(rt.config.get("max_position_embeddings") or 2048),
                                     int(time.time()))
                self._template(served)
                engine.start()
                self.models[name] = served
                log.info("loaded %s from %s in %.1f s (%s kernels, %d layers: %s)", name, path,
                         time.perf_counter() - t0, rt.kernels, len(rt.layers),
                         ", ".join(sorted(set(rt.config["layer_types"]))))
            self.state = "ready"
        except Exception as err:  # noqa: BLE001 - reported on /health and by the CLI, which then exits
            self.state, self.error = "failed", f"{type(err).__name__}: {err}"
            log.error("could not load the models: %s", self.error)
            if self.on_failure is not None:
                self.on_failure()

    @staticmethod
    def _template(served: ServedModel) -> None:
        source = served.rt.chat_template
        if not source:
            served.template_problem = (f"model {served.name!r} has no chat template in its .cmx file; use "
                                       "/v1/completions")
            return
        tok, cfg = served.rt.tokenizer, served.rt.config

        def special(key: str) -> str:
            ids = cfg.get(key)
            ids = ids[0] if isinstance(ids, list) and ids else ids
            return (tok.id_to_token(ids) or "") if isinstance(ids, int) else ""

        try:
            served.template = ChatTemplate(source, special("bos_token_id"), special("eos_token_id"))
        except TemplateError as err:
            served.template_problem = f"model {served.name!r}: {err}"
            log.warning(served.template_problem)
            return
        problem = served.template.check()
        if problem:
            log.warning("model %s: its chat template fails on a sample conversation: %s", served.name, problem)

    def close(self) -> None:
        self.worker.close()  # every model's engine runs on it
        if self.state != "failed":
            self.state = "stopped"

    def require_ready(self) -> None:
        if self.state != "ready":
            raise ApiError(503, "the server is still loading its models" if self.state == "loading" else
                           f"the server has no models: {self.error or self.state}", code="not_ready",
                           headers={"Retry-After": "1"})

    def model(self, name: str) -> ServedModel:
        self.require_ready()
        served = self.models.get(name)
        if served is None:
            raise ApiError(404, f"The model `{name}` does not exist (served: {', '.join(self.models)})", "model",
                           "model_not_found")
        return served

    def authorize(self, request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided" if header else
                           "You didn't provide an API key: send it as `Authorization: Bearer KEY`",
                           code="invalid_api_key")


# --------------------------------------------------------------------------- the app
def build_app(models: dict[str, str | Path], config: ServeConfig | None = None, *, load: bool = True,
              on_failure: Callable[[], None] | None = None):
    """The FastAPI app serving `models` ({name: path to a .cmx file}).

    Args:
        models: the models, each under its name (what requests put in `model`).
        config: parallel slots, queue size, prefix cache, kernels, API key (`ServeConfig`).
        load: start loading the models in a background thread when the app starts (`/health` answers 503
            until they are loaded); False leaves it to the caller (`app.state.server.load()`).
        on_failure: called when a model fails to load (the CLI stops the server with it).

    `app.state.server` is the `Server`: its models, engines and metrics.
    """
    config = config or ServeConfig()
    config.check()
    if not models:
        raise ValueError("serve: give at least one .cmx file")
    server = Server({n: Path(p) for n, p in models.items()}, config, on_failure=on_failure)

    @asynccontextmanager
    async def lifespan(app):
        if load:
            threading.Thread(target=server.load, name="codexmini-load", daemon=True).start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="codexmini", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        server.metrics.inc("codexmini_requests_total", model=getattr(request.state, "model", ""),
                           endpoint=request.url.path, status=str(err.status))
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err):
        message = {404: f"Unknown path: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return JSONResponse(error_body(err.status_code, message), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        return JSONResponse(error_body(400, f"invalid request: {err.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, err):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error (see the server log)"), status_code=500)

    @app.get("/health")
    async def health():
        body = {"status": {"ready": "ok"}.get(server.state, server.state)}
        if server.error:
            body["message"] = server.error
        if server.state == "ready":
            body["models"] = list(server.models)
        return JSONResponse(body, status_code=200 if server.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        server.authorize(request)
        for m in server.models.values():  # gauges as of now (the engine sets them between steps)
            waiting, active = m.engine.load()
            server.metrics.set("codexmini_queue_depth", waiting, model=m.name)
            server.metrics.set("codexmini_active_sequences", active, model=m.name)
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        server.authorize(request)
        server.require_ready()
        return {"object": "list", "data": [_model_card(m) for m in server.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        server.authorize(request)
        return _model_card(server.model(name))

    async def begin(request: Request):
        """What every generation request does first: note its arrival, check the key, read the body, find the
        model it names."""
        arrival = time.monotonic()
        server.authorize(request)
        body = await _read_json(request)
        served = server.model(requested_model(body))
        request.state.model = served.name
        return arrival, body, served

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival, body, served = await begin(request)
        req = parse_completion(body, served.vocab_size)
        if isinstance(req.prompt, str):
            ids = await asyncio.to_thread(served.encode, req.prompt)
        else:
            ids = req.prompt
        job = _submit(served, ids, req.params, "prompt", arrival)
        rid, created = new_id("cmpl"), now()
        server.metrics.inc("codexmini_requests_total", model=served.name, endpoint="/v1/completions",
                           status="200")
        if req.stream:
            return _stream(job, _completion_chunks(job, served.name, rid, created, req.include_usage,
                                                   req.params.logprobs is not None))
        text, tokens, fin = await _collect(job, request)
        choice = {"text": text, "index": 0, "finish_reason": fin.reason,
                  "logprobs": completion_logprobs(tokens) if req.params.logprobs is not None else None}
        return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                "system_fingerprint": _fingerprint(served), "choices": [choice],
                "usage": usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrival, body, served = await begin(request)
        req = parse_chat(body, served.vocab_size)
        if served.template is None:
            raise ApiError(400, served.template_problem or "this model has no chat template", "model",
                           "no_chat_template")
        prompt = await asyncio.to_thread(served.template.render, req.messages)
        ids = await asyncio.to_thread(served.encode, prompt)
        job = _submit(served, ids, req.params, "messages", arrival)
        rid, created = new_id("chatcmpl"), now()
        server.metrics.inc("codexmini_requests_total", model=served.name, endpoint="/v1/chat/completions",
                           status="200")
        if req.stream:
            return _stream(job, _chat_chunks(job, served, rid, created, req.include_usage,
                                             req.params.logprobs is not None))
        text, tokens, fin = await _collect(job, request)
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": chat_logprobs(tokens) if req.params.logprobs is not None else None,
                  "finish_reason": fin.reason}
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                "system_fingerprint": _fingerprint(served), "choices": [choice],
                "usage": usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens)}

    return app


# --------------------------------------------------------------------------- request helpers
def _model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "codexmini",
            "context_length": m.context, "layer_types": sorted(set(m.rt.config["layer_types"]))}


def _fingerprint(m: ServedModel) -> str:
    return f"cmx-{m.rt.checksum[:12]}"


async def _read_json(request) -> dict:
    size, parts = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY >> 20} MiB", code="request_too_large")
        parts.append(chunk)
    try:
        body = json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request ({err}). The body must be a JSON "
                       "object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _submit(served: ServedModel, ids: list[int], params: GenParams, param: str, arrival: float) -> Job:
    if not ids:
        raise ApiError(400, f"the {param} is empty: it must hold at least one token", param, "empty_prompt")
    room = served.context - len(ids)
    if room <= 0:
        raise ApiError(400, f"This model's maximum context length is {served.context} tokens. However, your "
                       f"{param} resulted in {len(ids)} tokens. Please reduce the length of the {param}.", param,
                       "context_length_exceeded")
    max_new = room if params.max_tokens is None else min(params.max_tokens, room)
    try:
        return served.engine.submit(ids, params, max_new, arrival)
    except QueueFull as err:
        raise ApiError(503, f"The server is overloaded ({err}); retry shortly.", code="overloaded",
                       headers={"Retry-After": "1"}) from None


async def _watch_disconnect(request, job: Job) -> None:
    """Cancel `job` when the client goes away (the ASGI server says so on `receive` once the body is read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _collect(job: Job, request) -> tuple[str, list, Finish]:
    """Wait for a whole completion (cancelling it if the client disconnects meanwhile)."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    text, tokens = [], []
    try:
        while True:
            ev = await job.events.get()
            if isinstance(ev, Delta):
                text.append(ev.text)
                tokens.extend(ev.tokens)
            elif isinstance(ev, Finish):
                return "".join(text), tokens, ev
            elif isinstance(ev, Failure):
                raise ApiError(500, ev.message, code="generation_failed")
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once finished


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(job: Job, on_delta, on_finish) -> AsyncIterator[str]:
    """The stream's events: `on_delta(text, tokens)` / `on_finish(Finish)` give the chunks; then `[DONE]`.
    Tokens whose text is still held back (a possible stop string, half a character) ride with the next text."""
    pending = []
    while True:
        ev = await job.events.get()
        if isinstance(ev, Delta):
            pending.extend(ev.tokens)
            if ev.text:
                yield on_delta(ev.text, pending)
                pending = []
        elif isinstance(ev, Finish):
            if pending:
                yield on_delta("", pending)
            for chunk in on_finish(ev):
                yield chunk
            break
        elif isinstance(ev, Failure):
            yield sse_error(ApiError(500, ev.message, code="generation_failed"))
            break
    yield "data: [DONE]\n\n"


def _completion_chunks(job, model: str, rid: str, created: int, include_usage: bool, logprobs: bool):
    offset = [0]

    def chunk(text, finish=None, lp=None):
        out = {"id": rid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return _sse(out)

    def on_delta(text, tokens):
        lp = completion_logprobs(tokens, offset[0]) if logprobs else None
        offset[0] += sum(len(t.text) for t in tokens)
        return chunk(text, lp=lp)

    def on_finish(fin):
        yield chunk("", fin.reason)
        if include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                        "usage": usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens)})

    return _events(job, on_delta, on_finish)


def _chat_chunks(job, served: ServedModel, rid: str, created: int, include_usage: bool, logprobs: bool):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name,
            "system_fingerprint": _fingerprint(served)}

    def chunk(delta, finish=None, lp=None):
        out = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return _sse(out)

    def on_delta(text, tokens):
        return chunk({"content": text}, lp=chat_logprobs(tokens) if logprobs else None)

    def on_finish(fin):
        yield chunk({}, fin.reason)
        if include_usage:
            yield _sse({**base, "choices": [],
                        "usage": usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens)})

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        async for e in _events(job, on_delta, on_finish):
            yield e

    return events()


class EventStream(Response):
    """A server-sent-event response that cancels its job the moment the client disconnects (`_send_events`)."""

    def __init__(self, job: Job, events: AsyncIterator[str]):
        super().__init__(media_type="text/event-stream")
        self.job, self.events = job, events

    async def __call__(self, scope, receive, send) -> None:
        await _send_events(self.job, self.events, receive, send)


def _stream(job: Job, events: AsyncIterator[str]) -> EventStream:
    return EventStream(job, events)


async def _send_events(job: Job, events: AsyncIterator[str], receive, send) -> None:
    """Send `events` while watching the connection (whatever ASGI version the server speaks): when the client
    goes away the job is cancelled at once, and the generator is always closed."""
    import anyio

    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]})
    try:
        async with anyio.create_task_group() as tg:
            async def pump():
                try:
                    async for chunk in events:
                        await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the client is gone (ASGI 2.4 servers raise on send)
                    pass
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(pump)
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()
    finally:
        job.cancel()
        await events.aclose()
