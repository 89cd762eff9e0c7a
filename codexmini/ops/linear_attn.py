"""Causal linear attention: one signature, three implementations, and the layers' normaliser.

All take feature-mapped queries and keys (`phi(q)`, `phi(k)`, already non-negative where the feature map makes
them so) and compute the *unnormalised* causal linear attention

    S_t = g * S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

with an optional per-head decay `g = exp(log_decay)` in (0, 1]. Normalisation is the caller's business: layers
append a column of ones to `v` (`append_ones`), so the last output column is the denominator, and divide by it
(`normalise`).

Shapes: q, k `[B, H, T, K]`, v `[B, H, T, V]`, state `[B, H, K, V]`, log_decay `[H]` (<= 0) or None.

- `naive_linear_attn`: the quadratic parallel form, the reference.
- `recurrent_linear_attn`: the token-by-token recurrence, used for decoding; its state never grows.
- `chunk_linear_attn`: chunked parallel form for training and prefill: quadratic inside a chunk, recurrent across
  chunks, so memory is O(T * C + K * V) instead of O(T^2).
- `linear_attn`: what a layer (model or runtime) runs: the recurrence for one token, the chunked form otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Keeps linear-attention outputs finite where a relu feature map gives an all-zero normaliser.
NORMALISER_EPS = 1e-6


def _prep(q, k, v, scale, log_decay):
    if q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"linear attention expects q, k [B,H,T,K] and v [B,H,T,V]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 if scale is None else scale
    if log_decay is not None and log_decay.shape != (q.shape[1],):
        raise ValueError(f"log_decay must have shape [H]={q.shape[1]}, got {tuple(log_decay.shape)}")
    return scale


def naive_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, log_decay=None):
    """Quadratic reference: `o = (mask * decay * q k^T) v + decayed contribution of the initial state`.

    Args:
        q, k: `[B, H, T, K]`; v `[B, H, T, V]`; initial_state `[B, H, K, V]` or None; log_decay `[H]` or None.

    Returns:
        o `[B, H, T, V]` in v's dtype, and the final state `[B, H, K, V]` (float32) if `output_final_state`.
    """
    scale = _prep(q, k, v, scale, log_decay)
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    T = q.shape[2]
    t = torch.arange(T, device=q.device)
    diff = (t[:, None] - t[None, :]).float()  # i - j
    causal = diff >= 0
    if log_decay is None:
        weights = causal.float()[None]  # [1, T, T]
        carry = torch.ones(1, T, device=q.device)
        final_carry = torch.ones(1, T, device=q.device)
    else:
        ld = log_decay.float()[:, None, None]  # [H, 1, 1]
        weights = torch.where(causal, torch.exp(ld * diff.clamp(min=0)), torch.zeros((), device=q.device))
        carry = torch.exp(ld[:, :, 0] * (t + 1).float())  # [H, T]: g^(i+1) on S_0
        final_carry = torch.exp(ld[:, :, 0] * (T - 1 - t).float())  # [H, T]: g^(T-1-j) on k_j v_j
    attn = (q @ k.transpose(-1, -2)) * weights  # [B, H, T, T]
    o = attn @ v
    if initial_state is not None:
        o = o + (q @ initial_state.float()) * carry[None, :, :, None]
    final = None
    if output_final_state:
        final = (k * final_carry[None, :, :, None]).transpose(-1, -2) @ v
        if initial_state is not None:
            total = torch.ones(q.shape[1], device=q.device) if log_decay is None else torch.exp(log_decay.float() * T)
            final = final + initial_state.float() * total[None, :, None, None]
    return (o * scale).to(dtype), final


def recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, log_decay=None):
    """Token-by-token recurrence: the decoding form, with a fixed-size state.

    Args:
        q, k: `[B, H, T, K]`; v `[B, H, T, V]`; initial_state `[B, H, K, V]` or None; log_decay `[H]` or None.

    Returns:
        o `[B, H, T, V]` in v's dtype, and the final state `[B, H, K, V]` (float32) if `output_final_state`.
    """
    scale = _prep(q, k, v, scale, log_decay)
    B, H, T, K = q.shape
    dtype = v.dtype
    state = (torch.zeros(B, H, K, v.shape[-1], device=q.device, dtype=torch.float32)
             if initial_state is None else initial_state.float())
    g = None if log_decay is None else torch.exp(log_decay.float())[None, :, None, None]
    outs = []
    for i in range(T):
        kv = k[:, :, i, :, None].float() * v[:, :, i, None, :].float()
        state = state * g + kv if g is not None else state + kv
        outs.append((q[:, :, i, None, :].float() @ state).squeeze(2))
    o = torch.stack(outs, dim=2) * scale
    return o.to(dtype), (state if output_final_state else None)


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, log_decay=None,
                      chunk_size=64):
    """Chunked parallel form: equal to `naive_linear_attn` up to float rounding.

    Args:
        q, k: `[B, H, T, K]`; v `[B, H, T, V]`; initial_state `[B, H, K, V]` or None; log_decay `[H]` or None.
        chunk_size: tokens per chunk C: the parts inside a chunk are quadratic (C x C), the chunks recurrent.

    Returns:
        o `[B, H, T, V]` in v's dtype, and the final state `[B, H, K, V]` (float32) if `output_final_state`.
    """
    scale = _prep(q, k, v, scale, log_decay)
    B, H, T, K = q.shape
    V = v.shape[-1]
    dtype = v.dtype
    C = min(chunk_size, T)
    n = (T + C - 1) // C
    pad = n * C - T
    q, k, v = q.float(), k.float(), v.float()
    if pad:
        # Zero keys/values at the end add nothing to the state; padded query rows are dropped at the end.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    q, k, v = (x.reshape(B, H, n, C, x.shape[-1]) for x in (q, k, v))
    t = torch.arange(C, device=q.device)
    diff = (t[:, None] - t[None, :]).float()
    causal = diff >= 0
    if log_decay is None:
        intra = causal.float()
        qc = q
    else:
        ld = log_decay.float()[:, None, None]  # [H, 1, 1]
        intra = torch.where(causal, torch.exp(ld * diff.clamp(min=0)), torch.zeros((), device=q.device))  # [H,C,C]
        intra = intra[None, :, None]  # [1, H, 1, C, C]
        qc = q * torch.exp(ld[:, :, 0] * (t + 1).float())[None, :, None, :, None]  # g^(i+1) on the carried state
        k_carry = torch.exp(ld[:, :, 0] * (C - 1 - t).float())[None, :, :, None]  # g^(C-1-j) into the new state
        chunk_decay = torch.exp(log_decay.float() * C)[None, :, None, None]
    # Everything inside a chunk is done for all chunks at once.
    o = ((q @ k.transpose(-1, -2)) * intra) @ v  # [B, H, n, C, V]
    state = (torch.zeros(B, H, K, V, device=q.device, dtype=torch.float32)
             if initial_state is None else initial_state.float())
    # Only this short loop over chunks is sequential: n = T / C steps of a [K, V] state. Each chunk's k^T v is
    # made inside it, so at most one [K, V] update exists at a time (a wide feature map makes K large).
    inter = []
    for c in range(n):
        inter.append(qc[:, :, c] @ state)
        if c == n - 1 and not output_final_state:
            break
        kc, vc = k[:, :, c], v[:, :, c]
        if log_decay is None:
            state = state + kc.transpose(-1, -2) @ vc
        elif c == n - 1 and pad:
            # The last chunk is short: its keys decay by g^(L-1-j) and the old state by g^L, L = C - pad.
            L = C - pad
            ld4 = log_decay.float()[None, :, None, None]
            kd = torch.exp(ld4 * (L - 1 - t[:L]).float()[None, None, :, None])
            state = state * torch.exp(ld4 * L) + (kc[:, :, :L] * kd).transpose(-1, -2) @ vc[:, :, :L]
        else:
            state = state * chunk_decay + (kc * k_carry).transpose(-1, -2) @ vc
    o = o + torch.stack(inter, dim=2)
    o = o.reshape(B, H, n * C, V)[:, :, :T] * scale
    return o.to(dtype), (state if output_final_state else None)


def linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, log_decay=None, chunk_size=64):
    """What a layer runs: `recurrent_linear_attn` for a single token (decoding), `chunk_linear_attn` otherwise.

    Shapes as `chunk_linear_attn`."""
    if q.shape[2] == 1:
        return recurrent_linear_attn(q, k, v, scale, initial_state, output_final_state, log_decay)
    return chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, log_decay, chunk_size=chunk_size)


def append_ones(v: torch.Tensor) -> torch.Tensor:
    """`[..., V]` -> `[..., V + 1]` with a last column of ones: linear attention over it accumulates the
    normaliser `sum_j phi(q) . phi(k_j)` in the last output column."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def normalise(o: torch.Tensor, eps: float = NORMALISER_EPS) -> torch.Tensor:
    """Linear attention's output over `append_ones(v)`, `[..., V + 1]`, divided by its last column: `[..., V]`
    float32."""
    o = o.float()
    return o[..., :-1] / (o[..., -1:] + eps)
