"""Hybrid window attention: softmax over the last `window` keys plus linear attention over every older key.

As in LoLCATs, both parts share one normaliser:

    o_i = (sum_win exp(s_ij - m_i) v_j + sum_old phi(q_i).phi(k_j) g^(i-j-w) v_j)
          / (sum_win exp(s_ij - m_i) + sum_old phi(q_i).phi(k_j) g^(i-j-w) + eps)

with `s_ij = scale * q_i . k_j`, the window `i - w < j <= i`, the older keys `j <= i - w`, `m_i` the row maximum over
the window, and an optional per-head decay `g` (a key starts to decay when it leaves the window). Keys leave the
window into a linear state, so decoding keeps a window of fixed length plus a fixed-size state.

- `naive_hybrid_attn`: the quadratic, masked reference.
- `hybrid_attn`: what the model's `HybridAttention` and the runtime run, continuing a carried window and state:
  `older_keys` aligns the keys leaving the window with the queries, so plain causal linear attention
  (`linear_attn.linear_attn`) does the old part; `window_softmax` does the window a block at a time.

Shapes: queries and keys per query head (key/value heads already repeated), `[B, H, T, D]`; features `[B, H, T, F]`;
values with the ones column (`linear_attn.append_ones`) `[B, H, T, D + 1]`; the state `[B, H, F, D + 1]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .linear_attn import NORMALISER_EPS, linear_attn


def naive_hybrid_attn(q, k, v, fq, fk, window: int, scale: float, log_decay=None, eps: float = NORMALISER_EPS):
    """Quadratic reference of hybrid attention over a whole sequence (no carried window or state, no padding).

    Args:
        q, k, v: `[B, H, T, D]` (rotary applied to q and k).
        fq, fk: `[B, H, T, F]`, the feature maps of q and k.
        window: softmax window length w (query i sees keys i-w < j <= i by softmax, older ones linearly).
        scale: softmax scale (usually D ** -0.5).
        log_decay: `[H]` (<= 0) or None.

    Returns:
        `[B, H, T, D]` float32.
    """
    q, k, v, fq, fk = (x.float() for x in (q, k, v, fq, fk))
    T = q.shape[2]
    t = torch.arange(T, device=q.device)
    diff = t[:, None] - t[None, :]  # i - j
    in_window, older = (diff >= 0) & (diff < window), diff >= window
    s = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~in_window, float("-inf"))
    a = torch.exp(s - s.amax(-1, keepdim=True))  # the diagonal is always in the window: the maximum is finite
    if log_decay is None:
        weights = older.float()
    else:
        ld = log_decay.float()[:, None, None]
        weights = torch.where(older, torch.exp(ld * (diff - window).clamp(min=0).float()),
                              torch.zeros((), device=q.device))
    lin = (fq @ fk.transpose(-1, -2)) * weights
    num = a @ v + lin @ v
    return num / (a.sum(-1, keepdim=True) + lin.sum(-1, keepdim=True) + eps)


def older_keys(x: torch.Tensor, new_tokens: int, window: int) -> torch.Tensor:
    """The keys (or values) that leave the window as each new query arrives, aligned with the queries.

    Query i of the `T = new_tokens` new ones sees by softmax the combined keys up to index wc + i, and linearly the
    ones at combined index <= wc + i - window (wc = carried window keys). Left-padding the combined keys by
    `window` lines key wc + i - window up with query i, so plain causal linear attention over the aligned keys
    gives each query exactly the keys older than its window.

    Args:
        x: `[..., wc + T, F]`, carried window keys then the new ones.

    Returns:
        `[..., T, F]`: row i holds combined key wc + i - window (zeros where there is none yet).
    """
    wc = x.shape[-2] - new_tokens
    return F.pad(x, (0, 0, window, 0))[..., wc:wc + new_tokens, :]


def window_softmax(q, k_all, v_all, window: int, scale: float, valid=None, block_size: int = 64):
    """Unnormalised sliding-window softmax, a block of queries at a time, so memory is O(T * (block + window)),
    not O(T^2).

    Args:
        q: `[B, H, T, D]`, the new queries.
        k_all, v_all: `[B, H, wc + T, D]`, the carried window (wc <= window) then the new keys / values.
        window: query i sees the combined keys (wc + i - window, wc + i].
        scale: softmax scale.
        valid: `[B, wc + T]` bool (False = padding, never attended to) or None for all valid.
        block_size: queries per block, at most (the block is also at most `window` and T long).

    Returns:
        numerator `[B, H, T, D]` and denominator `[B, H, T, 1]`, float32, both scaled by exp(-row maximum).
    """
    B, H, T, D = q.shape
    w = window
    wc = k_all.shape[2] - T
    if valid is None:
        valid = torch.ones(B, wc + T, dtype=torch.bool, device=q.device)
    if T == 1:
        # One decoding token: its window is simply the last `w` combined keys.
        k, v, ok = k_all[:, :, -w:].float(), v_all[:, :, -w:].float(), valid[:, None, None, -w:]
        scores = ((q.float() @ k.transpose(-1, -2)) * scale).masked_fill(~ok, float("-inf"))  # [B, H, 1, <=w]
        m = scores.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with nothing to attend to
        a = torch.exp(scores - m)
        return a @ v, a.sum(-1, keepdim=True)
    C = min(block_size, w, T)
    nb = math.ceil(T / C)
    # Extended key index = combined index + (w - wc): query i then sits at extended index i + w and sees
    # extended keys (i, i + w]. Query block b (queries [b*C, b*C + C)) needs extended keys [b*C, b*C + C + w).
    front, back = w - wc, nb * C - T
    k_ext = F.pad(k_all.float(), (0, 0, front, back))
    v_ext = F.pad(v_all.float(), (0, 0, front, back))
    ok_ext = F.pad(valid, (front, back), value=False)
    kb = k_ext.unfold(2, C + w, C).transpose(-1, -2)  # [B, H, nb, C + w, D]
    vb = v_ext.unfold(2, C + w, C).transpose(-1, -2)
    okb = ok_ext.unfold(1, C + w, C)[:, None, :, None, :]  # [B, 1, nb, 1, C + w]
    qb = F.pad(q.float(), (0, 0, 0, back)).reshape(B, H, nb, C, D)
    scores = (qb @ kb.transpose(-1, -2)) * scale  # [B, H, nb, C, C + w]
    r = torch.arange(C, device=q.device)[:, None]
    c = torch.arange(C + w, device=q.device)[None, :]
    allowed = (c > r) & (c <= r + w) & okb
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with nothing to attend to
    a = torch.exp(scores - m)
    num = (a @ vb).reshape(B, H, nb * C, D)[:, :, :T]
    den = a.sum(-1).reshape(B, H, nb * C, 1)[:, :, :T]
    return num, den


def hybrid_attn(q, k_all, fq, fk_all, v1_all, window: int, scale: float, initial_state=None, log_decay=None,
                valid=None, chunk_size: int = 64, eps: float = NORMALISER_EPS):
    """Hybrid attention for T new tokens, continuing a carried window (wc = `k_all.shape[2] - T` keys) and the
    linear state of every key older than it.

    Args:
        q: `[B, H, T, D]`; fq `[B, H, T, F]`.
        k_all: `[B, H, wc + T, D]`; fk_all `[B, H, wc + T, F]`; v1_all `[B, H, wc + T, D + 1]` (values with the ones
            column, padding zeroed): the carried window then the new tokens.
        window: softmax window length (the carried window holds at most this many keys).
        scale: softmax scale.
        initial_state: `[B, H, F, D + 1]` or None (no keys older than the window yet).
        log_decay: `[H]` or None.
        valid: `[B, wc + T]` bool or None (see `window_softmax`).
        chunk_size: chunk length of the linear part.

    Returns:
        o `[B, H, T, D]` float32 and the new linear state `[B, H, F, D + 1]`. The caller keeps the last `window`
        entries of k_all / fk_all / v1_all as the next carried window.
    """
    T = q.shape[2]
    o_lin, state = linear_attn(fq, older_keys(fk_all, T, window), older_keys(v1_all, T, window), 1.0,
                               initial_state, True, log_decay, chunk_size)
    num, den = window_softmax(q, k_all, v1_all[..., :-1], window, scale, valid)
    o_lin = o_lin.float()
    return (num + o_lin[..., :-1]) / (den + o_lin[..., -1:] + eps), state
