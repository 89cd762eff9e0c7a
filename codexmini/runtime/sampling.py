"""Sampling for the runtime: greedy, temperature, top-k, top-p, repetition penalty, stop strings, max tokens and a
seed; text streamed piece by piece (held back while it could still be the start of a stop string or is an
incomplete UTF-8 character)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL's rule)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eos: bool = True

    def check(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def next_token(logits: torch.Tensor, cfg: SamplingConfig, seen: list[int], gen: torch.Generator | None) -> int:
    """Pick the next token id from `[V]` logits."""
    logits = logits.float().clone()
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


def stream_tokens(rt, prompt_ids: list[int], cfg: SamplingConfig, session=None) -> Iterator[int]:
    """Token ids sampled after `prompt_ids` (prefilled into `session`, a fresh one if None)."""
    cfg.check()
    session = session if session is not None else rt.new_session()
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token (a restored session continues after new text)")
    logits = rt.forward(prompt_ids, session)
    for _ in range(cfg.max_tokens):
        tok = next_token(logits, cfg, session.tokens, gen)
        if cfg.stop_at_eos and tok in rt.eos_ids:
            return
        yield tok
        logits = rt.forward([tok], session)


def stream_text(rt, prompt: str, cfg: SamplingConfig, session=None) -> Iterator[str]:
    """Text pieces of the continuation of `prompt`, ending early at a stop string (which is not emitted)."""
    ids = rt.tokenizer.encode(prompt, add_special_tokens=False).ids
    out: list[int] = []
    emitted = ""
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    for tok in stream_tokens(rt, ids, cfg, session):
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
