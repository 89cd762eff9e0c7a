"""Server metrics in the Prometheus text format (version 0.0.4), without the prometheus_client dependency.

Counters, gauges and histograms keyed by label values; the engine threads write them and `GET /metrics` reads them,
under one lock. Throughput (tokens/s) is a gauge over the last `window` seconds; Prometheus' own `rate()` over
the token counters gives it at any other window.
"""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# name -> (kind, help)
METRICS = {
    "codexmini_requests_total": ("counter", "Requests answered, by model, endpoint and HTTP status."),
    "codexmini_prompt_tokens_total": ("counter", "Prompt tokens of admitted requests."),
    "codexmini_prompt_tokens_cached_total": ("counter", "Prompt tokens reused from the prefix cache."),
    "codexmini_generation_tokens_total": ("counter", "Tokens generated."),
    "codexmini_requests_cancelled_total": ("counter", "Generations stopped because the client went away."),
    "codexmini_requests_rejected_total": ("counter", "Requests refused with 503 because the queue was full."),
    "codexmini_prefix_cache_lookups_total": ("counter", "Prefix-cache lookups."),
    "codexmini_prefix_cache_hits_total": ("counter", "Prefix-cache lookups that reused at least one token."),
    "codexmini_prefix_cache_bytes": ("gauge", "Bytes held by the prefix cache."),
    "codexmini_prefix_cache_entries": ("gauge", "Sequences held by the prefix cache."),
    "codexmini_queue_depth": ("gauge", "Requests waiting for a decoding slot."),
    "codexmini_active_sequences": ("gauge", "Sequences being prefilled or decoded."),
    "codexmini_generation_tokens_per_second": ("gauge", "Tokens generated per second over the last 10 s."),
    "codexmini_decode_steps_total": ("counter", "Batched decode steps (one forward each)."),
    "codexmini_time_to_first_token_seconds": ("histogram", "Seconds from request arrival to its first token."),
    "codexmini_decode_batch_size": ("histogram", "Sequences decoded together per step."),
}


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


class Metrics:
    def __init__(self, window: float = 10.0):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {}
        self._label_names: dict[str, tuple[str, ...]] = {}
        self._hist: dict[str, dict[tuple, list]] = {}
        self._buckets = {"codexmini_time_to_first_token_seconds": TTFT_BUCKETS,
                         "codexmini_decode_batch_size": BATCH_BUCKETS}
        self.window = window
        self._recent: dict[str, deque] = {}  # model -> (time, tokens) of recent steps

    def _key(self, name: str, labels: dict) -> tuple:
        names = tuple(sorted(labels))
        self._label_names.setdefault(name, names)
        return tuple(labels[n] for n in names)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            d = self._values.setdefault(name, {})
            k = self._key(name, labels)
            d[k] = d.get(k, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values.setdefault(name, {})[self._key(name, labels)] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        with self._lock:
            h = self._hist.setdefault(name, {})
            k = self._key(name, labels)
            if k not in h:
                h[k] = [[0] * len(self._buckets[name]), 0.0, 0]
            counts, _, _ = entry = h[k]
            for i, b in enumerate(self._buckets[name]):
                if value <= b:
                    counts[i] += 1
            entry[1] += value
            entry[2] += 1

    def generated(self, model: str, tokens: int) -> None:
        """Count tokens generated in one step (for the counter and the tokens/s gauge)."""
        self.inc("codexmini_generation_tokens_total", tokens, model=model)
        now = time.monotonic()
        with self._lock:
            q = self._recent.setdefault(model, deque())
            q.append((now, tokens))
            self._forget(q, now)

    def _forget(self, q: deque, now: float) -> None:
        while q and q[0][0] < now - self.window:
            q.popleft()

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get(name, {}).get(self._key(name, labels), 0.0)

    def render(self) -> str:
        now = time.monotonic()
        with self._lock:
            for model, q in self._recent.items():
                self._forget(q, now)
                rate = sum(n for _, n in q) / self.window
                k = ("codexmini_generation_tokens_per_second", (model,))
                self._label_names.setdefault(k[0], ("model",))
                self._values.setdefault(k[0], {})[k[1]] = rate
            lines = []
            for name, (kind, help_) in METRICS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                names = self._label_names.get(name, ())
                if kind == "histogram":
                    for k, (counts, total, n) in sorted(self._hist.get(name, {}).items()):
                        for b, c in zip(self._buckets[name], counts):
                            lines.append(f"{name}_bucket{_labels(names + ('le',), k + (b,))} {c}")
                        lines.append(f"{name}_bucket{_labels(names + ('le',), k + ('+Inf',))} {n}")
                        lines.append(f"{name}_sum{_labels(names, k)} {total}")
                        lines.append(f"{name}_count{_labels(names, k)} {n}")
                    continue
                for k, v in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{name}{_labels(names, k)} {v:g}" if v != int(v) or abs(v) >= 1e15
                                 else f"{name}{_labels(names, k)} {int(v)}")
            return "\n".join(lines) + "\n"
