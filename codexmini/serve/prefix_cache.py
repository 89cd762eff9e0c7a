"""Prefix reuse across requests: a new request starts from the longest cached prefix of an earlier one (a system
prompt, the earlier turns of a chat) instead of running those tokens again.

Each entry is a finished request's session (its tokens, softmax KV caches and linear states), kept as it was left:
it is never run again, a request that reuses it gets a fork (`Runtime.fork`). How far a fork can reach depends on
the layers:
- softmax layers hold a KV cache, which can be cut back to any length: any shared prefix is usable;
- linear and hybrid layers hold a state that has absorbed every token, which cannot be cut back. So the engine takes
  checkpoints of those states at block boundaries (every `block` tokens, prefilled or decoded) and at the end of
  each prompt, and a fork resumes from the last checkpoint inside the shared prefix (or from the end of the entry
  when all of it is shared). A model with both kinds of layers is limited by its linear ones. llama.cpp's server
  re-processes the whole prompt for recurrent and hybrid models instead.
The logits after each prompt are kept too: the same prompt again starts sampling at once.

The cache holds at most `budget` bytes (KV caches, checkpoints, logits), evicting the least recently used entries.
An entry that is a prefix of a newer one is merged into it (its checkpoints kept, its KV dropped).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class Entry:
    session: object  # runtime Session, frozen
    tokens: bytes  # the session's tokens, packed (`pack`: compared with memcmp, see `common_prefix`)
    checkpoints: dict[int, object] = field(default_factory=dict)  # pos -> runtime Checkpoint
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # pos -> logits [V] after the first pos tokens
    nbytes: int = 0

    def measure(self) -> int:
        self.nbytes = (self.session.nbytes() + sum(c.nbytes() for c in self.checkpoints.values())
                       + sum(t.numel() * t.element_size() for t in self.logits.values()))
        return self.nbytes


@dataclass
class Hit:
    """Where a new request starts: `session` holds the first `cached` prompt tokens; `logits` are the logits after
    all of the prompt when it was cached whole (else None: at least one prompt token is left to run);
    `checkpoints` the reused entry's checkpoints inside the prefix, which the new request's entry inherits."""

    session: object
    cached: int
    logits: torch.Tensor | None = None
    checkpoints: dict[int, object] = field(default_factory=dict)


TOKEN_BYTES = 8


def pack(tokens: list[int]) -> bytes:
    """Token ids as bytes, `TOKEN_BYTES` each, for `common_prefix`."""
    return array("q", tokens).tobytes()


def common_prefix(a: bytes, b: bytes) -> int:
    """How many leading tokens two packed token sequences (`pack`) share: whole-prefix byte comparisons (memcmp),
    halving the range. Every lookup and insertion compares against each entry: with torch ops it cost ~5 us an
    entry, which a cache of a few hundred entries made milliseconds of the engine thread per request."""
    n = min(len(a), len(b)) // TOKEN_BYTES
    if a[:n * TOKEN_BYTES] == b[:n * TOKEN_BYTES]:
        return n
    lo, hi = 0, n  # a and b agree on lo tokens, not on hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid * TOKEN_BYTES] == b[:mid * TOKEN_BYTES]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """LRU cache of finished sessions for one model (`rt`), within `budget` bytes."""

    def __init__(self, rt, budget: int, block: int = 256):
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1, got {block}")
        self.rt, self.budget, self.block = rt, budget, block
        self.recurrent = rt.recurrent
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self._lock = threading.Lock()  # the engine thread writes; /metrics reads the sizes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def wants_checkpoint(self, pos: int) -> bool:
        """Whether a sequence that has just reached `pos` tokens should keep a checkpoint there."""
        return self.recurrent and self.budget > 0 and pos > 0 and pos % self.block == 0

    def _usable(self, e: Entry, shared: int, prompt_len: int) -> tuple[int, object]:
        """The furthest position of entry `e` a fork can start from within `shared` tokens (0: none), and the
        checkpoint it needs (None: the session's own state or KV suffices). Position `prompt_len` (the whole
        prompt) counts only when the logits there are known: something has to give the first token."""
        limit = shared if shared < prompt_len or prompt_len in e.logits else prompt_len - 1
        if not self.recurrent:
            return limit, None
        end = e.session.pos
        best, ck = (end, None) if end <= limit else (0, None)
        for pos, c in e.checkpoints.items():
            if best < pos <= limit:
                best, ck = pos, c
        return best, ck

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The longest reusable prefix of `prompt` as a fresh session (None: nothing usable is cached)."""
        if self.budget <= 0 or not prompt:
            return None
        ids = pack(prompt)
        with self._lock:
            best = (0, None, None)
            for key, e in reversed(self._entries.items()):  # most recent first: it wins ties
                pos, ck = self._usable(e, common_prefix(e.tokens, ids), len(prompt))
                if pos > best[0]:
                    best = (pos, key, ck)
            pos, key, ck = best
            if not pos:
                return None
            e = self._entries[key]
            self._entries.move_to_end(key)
            session = self.rt.fork(e.session, pos, ck)
            logits = e.logits.get(pos) if pos == len(prompt) else None
            return Hit(session, pos, logits, {p: c for p, c in e.checkpoints.items() if p <= pos})

    def insert(self, session, checkpoints: dict[int, object], logits: dict[int, torch.Tensor]) -> None:
        """Keep a finished request's session (the cache owns it from now on, nothing else may run it)."""
        if self.budget <= 0 or session.pos == 0:
            return
        new = Entry(session, pack(session.tokens), dict(checkpoints), dict(logits))
        with self._lock:
            covered = []
            for key, e in self._entries.items():
                shared = common_prefix(e.tokens, new.tokens)
                if shared == len(new.tokens) // TOKEN_BYTES:  # the new one is a prefix of e: e takes what it adds
                    e.checkpoints.update(new.checkpoints)
                    e.logits.update(new.logits)
                    before = e.nbytes
                    self.bytes += e.measure() - before
                    self._entries.move_to_end(key)
                    self._evict()
                    return
                if shared == len(e.tokens) // TOKEN_BYTES:  # e is a prefix of the new one, which will take its place
                    covered.append(key)
            for key in covered:
                e = self._entries[key]
                new.checkpoints = {**e.checkpoints, **new.checkpoints}
                new.logits = {**e.logits, **new.logits}
            if new.measure() > self.budget:  # too big to keep: the entries it covers stay
                return
            for key in covered:
                self._drop(key)
            self._entries[self._next] = new
            self._next += 1
            self.bytes += new.nbytes
            self._evict()

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def _evict(self) -> None:
        while self.bytes > self.budget and self._entries:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
