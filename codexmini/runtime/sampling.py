"""Sampling for the runtime: greedy, temperature, top-k, top-p, repetition penalty, stop strings, max tokens and a
seed; text streamed piece by piece (held back while it could still be the start of a stop string or is an
incomplete UTF-8 character)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .inputs import check_prompt_length, check_prompt_text, check_token_ids, max_positions


@dataclass
class SamplingConfig:
    """How text is sampled; `check()` refuses bad values with a message naming the field (called before any work).

    `stop` is a list of stop strings; a single string is one stop string (not a set of characters).
    """

    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL's rule)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eos: bool = True
    # A prompt longer than the model's positions (max_position_embeddings) is refused; with this set, only its
    # last tokens are run: as many as fit while leaving room for max_tokens (or half the room, if that is less).
    window_prompt: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def check(self) -> None:
        """Raise ValueError naming the field for any value sampling cannot use (NaN and infinities included)."""
        if isinstance(self.stop, str):  # set after construction: still one stop string
            self.stop = [self.stop]
        _int("max_tokens", self.max_tokens, 0)
        _real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _int("top_k", self.top_k, 0)
        _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a list of strings (or one string), got {type(self.stop).__name__}")
        for i, text in enumerate(self.stop):
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop[{i}] = {text!r} must be a non-empty string")
        if self.seed is not None:
            _int("seed", self.seed, 0)
            if self.seed >= 2 ** 64:
                raise ValueError(f"seed must be < 2**64, got {self.seed}")
        for name in ("stop_at_eos", "window_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def next_token(logits: torch.Tensor, cfg: SamplingConfig, seen: list[int], gen: torch.Generator | None) -> int:
    """Pick the next token id from `[V]` logits (not modified)."""
    if cfg.temperature == 0 and (cfg.repetition_penalty == 1.0 or not seen):
        # greedy: numpy's argmax reads the row in place (the first maximum, as torch's). torch's argmax and copy of
        # a vocabulary row run as parallel ops; on a 2-core VM their wake-up of the second thread cost 0.1-8 ms a
        # token, against 5 us here
        return int(logits.float().numpy().argmax())
    logits = copy_row(logits)
    if cfg.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


def copy_row(logits: torch.Tensor) -> torch.Tensor:
    """A private fp32 copy of a `[V]` row of logits, made by numpy on this thread (see `next_token`)."""
    return torch.from_numpy(logits.float().numpy().copy())


def adjusted_row(logits: torch.Tensor, bias: dict[int, float], counts: dict[int, int], frequency: float = 0.0,
                 presence: float = 0.0) -> torch.Tensor:
    """A private copy of a `[V]` row with OpenAI's adjustments: `bias[t]` added to token t's logit, and
    `frequency * counts[t] + presence` taken from each token already generated (`counts`: how often). In float32,
    through numpy on the copy: torch's indexing ops cost ~25 us a token, a few elements in numpy ~2."""
    out = copy_row(logits)
    row = out.numpy()
    if bias:
        ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
        row[ids] += np.fromiter(bias.values(), dtype=np.float32, count=len(ids))
    if counts and (frequency or presence):
        ids = np.fromiter(counts, dtype=np.int64, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float32, count=len(ids))
        row[ids] -= np.float32(frequency) * n + np.float32(presence)
    return out


def stream_tokens(rt, prompt_ids, cfg: SamplingConfig, session=None) -> Iterator[int]:
    """Token ids sampled after `prompt_ids` (prefilled into `session`, a fresh one if None).

    Everything is checked here, before the iterator is returned (not when it is first advanced): the settings,
    the ids (integers inside the vocabulary), and the prompt's length against the model's positions. Decoding
    stops when the model's positions are used up, as it does at `max_tokens`.
    """
    cfg.check()
    if prompt_ids is None or (isinstance(prompt_ids, (list, tuple)) and not prompt_ids) or \
            (torch.is_tensor(prompt_ids) and not prompt_ids.numel()):
        raise ValueError("empty prompt: give at least one token (a restored session continues after new text)")
    ids = check_token_ids(prompt_ids, int(rt.config["vocab_size"]))
    session = session if session is not None else rt.new_session()
    limit = max_positions(rt.config)
    keep = check_prompt_length(ids.numel(), limit, session.pos, cfg.window_prompt)
    if keep < ids.numel():  # windowed: leave room for the continuation too
        keep = max(1, keep - min(cfg.max_tokens, keep // 2))
        ids = ids[-keep:]
    return _sample(rt, ids, cfg, session, limit)


def _sample(rt, ids: torch.Tensor, cfg: SamplingConfig, session, limit: int | None) -> Iterator[int]:
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    logits = rt.forward(ids, session)
    for _ in range(cfg.max_tokens):
        tok = next_token(logits, cfg, session.tokens, gen)
        if cfg.stop_at_eos and tok in rt.eos_ids:
            return
        yield tok
        if limit is not None and session.pos >= limit:
            return  # every position of the model is used: the continuation ends here
        logits = rt.forward([tok], session)


def stream_text(rt, prompt, cfg: SamplingConfig, session=None) -> Iterator[str]:
    """Text pieces of the continuation of `prompt`, ending early at a stop string (which is not emitted).

    `prompt`: a string, or UTF-8 bytes. Checked (with the settings and the prompt's length) before the iterator
    is returned, so `Runtime.stream` refuses bad input at the call, not at the first `next()`.
    """
    cfg.check()
    text = check_prompt_text(prompt)
    tokens = stream_tokens(rt, rt.tokenizer.encode(text, add_special_tokens=False).ids, cfg, session)
    return _pieces(rt, tokens, cfg)


def _pieces(rt, tokens: Iterator[int], cfg: SamplingConfig) -> Iterator[str]:
    out: list[int] = []
    emitted = ""
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    for tok in tokens:
        out.append(tok)
        text = rt.tokenizer.decode(out, skip_special_tokens=True)
        cut = min((text.find(s) for s in cfg.stop if s and s in text), default=-1)
        if cut >= 0:
            if cut > len(emitted):
                yield text[len(emitted):cut]
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            continue
        safe = len(text) - hold if cfg.stop else len(text)
        if safe > len(emitted):
            yield text[len(emitted):safe]
            emitted = text[:safe]
    text = rt.tokenizer.decode(out, skip_special_tokens=True)
    if len(text) > len(emitted):
        yield text[len(emitted):]
