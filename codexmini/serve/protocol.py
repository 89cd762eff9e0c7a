"""The OpenAI request bodies this server takes, checked field by field, and the response objects it sends.

Parsing is by hand rather than with pydantic models: each bad value gets a 400 that names its parameter in OpenAI's
error shape (pydantic would answer 422 with its own), unknown fields are ignored as OpenAI ignores them, and the
fields this server does not implement (`n > 1`, tools, ...) get a 400 that says so instead of being silently
dropped.

Extensions beyond OpenAI's parameters (as vLLM names them): `top_k`, `repetition_penalty`, `ignore_eos`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from .errors import bad_param

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; more costs nothing here but each is checked per token)
MAX_TOP_LOGPROBS = 20


@dataclass
class GenParams:
    """What the engine needs to generate one completion. `max_tokens` None: up to the end of the context."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; else how many alternatives per token (0 = the chosen token only)
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    params: GenParams
    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int]
    params: GenParams
    stream: bool = False
    include_usage: bool = False


# --------------------------------------------------------------------------- field checks
def _number(body: dict, name: str, default, lo: float | None = None, hi: float | None = None,
            integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad_param(name, f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}",
                        "invalid_type")
    if integer and not (isinstance(v, int) or float(v).is_integer()):
        raise bad_param(name, f"{name} must be an integer, got {v!r}", "invalid_type")
    v = int(v) if integer else float(v)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise bad_param(name, f"{name} must be in {span}, got {v}")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_param(name, f"{name} must be a boolean, got {v!r}", "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_param("stop", "stop must be a string or a list of strings", "invalid_type")
    if len(v) > MAX_STOP:
        raise bad_param("stop", f"at most {MAX_STOP} stop strings, got {len(v)}")
    return [s for s in v if s]


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_param("logit_bias", "logit_bias must be an object mapping token ids to biases", "invalid_type")
    out = {}
    for key, bias in v.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise bad_param("logit_bias", f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= tok < vocab_size:
            raise bad_param("logit_bias", f"logit_bias token id {tok} is outside the vocabulary of {vocab_size}")
        out[tok] = _number({"logit_bias": bias}, "logit_bias", 0.0, -100, 100)
    return out


def _refuse(body: dict, name: str, allowed=(None,), why: str = "") -> None:
    """A 400 for a field this server does not implement, unless it holds a value that means 'not used'."""
    v = body.get(name)
    if v in allowed or (isinstance(v, (list, dict)) and not v and [] in allowed):
        return
    raise bad_param(name, f"{name} is not supported by this server{why}", "unsupported_parameter")


def _common(body: dict, vocab_size: int) -> tuple[GenParams, bool, bool]:
    """The sampling parameters chat and completions share, plus (stream, include_usage)."""
    _refuse(body, "n", (None, 1), ": it generates one choice per request (send n requests)")
    max_tokens = _number(body, "max_tokens", None, 0, integer=True)
    if body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", None, 0, integer=True)
    top_k = _number(body, "top_k", 0, -1, integer=True)
    params = GenParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=max(top_k, 0),  # -1 is vLLM's "off", as 0 is ours
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, lo_open=True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        stop=_stop(body),
        seed=_number(body, "seed", None, integer=True),
        logit_bias=_logit_bias(body, vocab_size),
        ignore_eos=_bool(body, "ignore_eos"),
    )
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_param("stream_options", "stream_options must be an object", "invalid_type")
    include_usage = bool(stream and opts and _bool(opts, "include_usage"))
    return params, stream, include_usage


def requested_model(body: dict) -> str:
    """The `model` a request names (400 when missing or not a string)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "model is required: the name of a served model (GET /v1/models lists them)",
                        "missing_required_parameter" if model is None else "invalid_type")
    return model


# --------------------------------------------------------------------------- requests
ROLES = {"system", "user", "assistant", "developer"}


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    where = f"messages[{i}].content"
    if c is None:
        if msg.get("role") == "assistant" and not msg.get("tool_calls"):
            return ""
        raise bad_param(where, f"{where} is required", "missing_required_parameter")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad_param(f"{where}[{j}]", f"{where}[{j}]: only text content parts are supported "
                                f"(got type {kind!r})", "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_param(where, f"{where} must be a string or a list of content parts", "invalid_type")


def parse_chat(body: dict, vocab_size: int) -> ChatRequest:
    model = requested_model(body)
    for name in ("tools", "functions"):
        _refuse(body, name, (None, []), ": this model has no tool calling")
    _refuse(body, "tool_choice", (None, "none"), ": this model has no tool calling")
    _refuse(body, "function_call", (None, "none"), ": this model has no tool calling")
    _refuse(body, "response_format", (None, {"type": "text"}), ": only plain text output")
    _refuse(body, "audio", (None,), ": text only")
    _refuse(body, "modalities", (None, ["text"]), ": text only")
    _refuse(body, "prediction", (None,))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "messages must be a non-empty list of {role, content} objects",
                        "missing_required_parameter" if messages is None else "invalid_type")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad_param(f"messages[{i}]", f"messages[{i}] must be an object", "invalid_type")
        role = msg.get("role")
        if role in ("tool", "function"):
            raise bad_param(f"messages[{i}].role", f"messages[{i}]: role {role!r} needs tool calling, which this "
                            "server does not support", "unsupported_parameter")
        if role not in ROLES:
            raise bad_param(f"messages[{i}].role", f"messages[{i}].role must be one of {sorted(ROLES)}, got "
                            f"{role!r}")
        if msg.get("tool_calls"):
            raise bad_param(f"messages[{i}].tool_calls", "tool calls are not supported by this server",
                            "unsupported_parameter")
        entry = {"role": "system" if role == "developer" else role, "content": _content(msg, i)}
        if isinstance(msg.get("name"), str):
            entry["name"] = msg["name"]
        out.append(entry)
    params, stream, include_usage = _common(body, vocab_size)
    if _bool(body, "logprobs"):
        params.logprobs = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    elif body.get("top_logprobs") is not None:
        raise bad_param("top_logprobs", "top_logprobs needs logprobs: true")
    return ChatRequest(model, out, params, stream, include_usage)


def parse_completion(body: dict, vocab_size: int) -> CompletionRequest:
    model = requested_model(body)
    _refuse(body, "best_of", (None, 1), ": it generates one choice per request")
    _refuse(body, "echo", (None, False))
    _refuse(body, "suffix", (None, ""))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise bad_param("prompt", "one prompt per request: send a request for each prompt",
                            "unsupported_parameter")
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad_param("prompt", "prompt must be a string or a non-empty list of token ids", "invalid_type")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise bad_param("prompt", f"token id {bad[0]} is outside the vocabulary of {vocab_size}")
    elif not isinstance(prompt, str):
        raise bad_param("prompt", "prompt is required: a string or a list of token ids",
                        "missing_required_parameter" if prompt is None else "invalid_type")
    params, stream, include_usage = _common(body, vocab_size)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        params.max_tokens = 16  # OpenAI's default for completions
    lp = body.get("logprobs")
    if lp is not None and lp is not False:
        params.logprobs = _number(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    return CompletionRequest(model, prompt, params, stream, include_usage)


# --------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_logprobs(tokens: list) -> dict:
    """OpenAI's chat `logprobs` object from the engine's `TokenLogprob`s."""
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(b)} for s, lp, b in t.top]}
                        for t in tokens], "refusal": None}


def completion_logprobs(tokens: list, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for s, lp, _ in t.top} for t in tokens], "text_offset": offsets}
