"""Runtime measurements: prefill tokens/s, decode tokens/s at several context lengths, time to first token and
peak memory (the process's resident-set high-water mark)."""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux) in bytes; None where it cannot be read."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark. On Linux from /proc (VmHWM belongs to the process's own
    address space; getrusage's ru_maxrss survives exec and would report a parent's peak)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where it cannot be read)."""
    return _proc_status_bytes("VmRSS") or 0


def bench_context(rt, context: int, decode_tokens: int = 32, seed: int = 0) -> dict:
    """Prefill `context` tokens, then decode `decode_tokens` greedily; per-token decode times (median)."""
    return bench(rt, [context], decode_tokens, seed)[0]


def interleaved(prefill, step, vocab: int, contexts=(16, 1024, 4096), decode_tokens: int = 32,
                seed: int = 0) -> tuple[list[dict], list]:
    """The timing protocol of `bench` (and of scripts/bench_runtime.py's llama.cpp worker): one sequence per
    context length, each prefilled with random ids (`prefill(ids) -> (state, first greedy token)`), then decoded
    in turn, one greedy token each per round (`step(state, token) -> next token`), so that a slow spell of a
    shared machine falls on every context alike and the ratios between contexts hold. Returns a row per context
    (prefill tokens/s, TTFT, median decode time per token, peak memory with every sequence alive) and the states."""
    g = torch.Generator().manual_seed(seed)
    rows, live = [], []
    for context in contexts:
        ids = torch.randint(0, vocab, (context,), generator=g)
        t0 = time.perf_counter()
        state, tok = prefill(ids)
        ttft = time.perf_counter() - t0
        rows.append({"context": context, "prefill_tokens_per_s": context / ttft, "ttft_s": ttft})
        live.append([state, tok, []])
    for _ in range(decode_tokens):
        for entry in live:
            t = time.perf_counter()
            entry[1] = step(entry[0], entry[1])
            entry[2].append(time.perf_counter() - t)
    for r, (_, _, times) in zip(rows, live):
        per_token = statistics.median(times)
        r.update(decode_ms_per_token=per_token * 1e3, decode_tokens_per_s=1 / per_token,
                 peak_rss_bytes=peak_rss_bytes())
    return rows, [state for state, _, _ in live]


def bench(rt, contexts=(16, 1024, 4096), decode_tokens: int = 32, seed: int = 0) -> list[dict]:
    """The runtime under `interleaved`: per context, prefill and decode speed, TTFT, its session's bytes and those
    of all sessions together."""
    def prefill(ids):
        session = rt.new_session()
        return session, int(rt.forward(ids, session).argmax())

    rows, sessions = interleaved(prefill, lambda session, tok: int(rt.forward([tok], session).argmax()),
                                 rt.embed.shape[0], contexts, decode_tokens, seed)
    total_state = sum(session.nbytes() for session in sessions)
    for r, session in zip(rows, sessions):
        r.update(state_bytes=session.nbytes(), all_states_bytes=total_state)
    return rows


def format_table(rows: list[dict], file_bytes: int | None = None) -> str:
    out = ["| context | prefill tok/s | TTFT s | decode tok/s | decode ms/token | state MB | peak RSS MB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['context']} | {r['prefill_tokens_per_s']:.0f} | {r['ttft_s']:.3f} | "
                   f"{r['decode_tokens_per_s']:.1f} | {r['decode_ms_per_token']:.2f} | {r['state_bytes'] / 1e6:.2f} | "
                   f"{r['peak_rss_bytes'] / 1e6:.0f} |")
    if file_bytes is not None:
        out.append(f"\nfile: {file_bytes / 1e6:.1f} MB")
    return "\n".join(out)
