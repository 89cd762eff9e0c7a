"""Rotary position embedding (RoPE), as Llama computes it: rotate each (i, i + D/2) pair of a head by
`position * theta^(-2i/D)`."""

from __future__ import annotations

import functools

import torch


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32):
    """Llama's RoPE tables.

    Computed on the fly (a few flops per token) rather than kept in a buffer, so nothing derived is saved or needs
    re-initialising after a meta-device load (only the inverse frequencies are cached, per D, theta and device).

    Args:
        position_ids: `[..., T]` integer positions (the model passes `[B, T]`, the runtime `[T]`).
        head_dim: D, even.
        theta: the RoPE base (`rope_theta`).
        dtype: dtype of the tables (the angles are computed in fp32 either way).

    Returns:
        cos, sin `[..., T, D]`.
    """
    freqs = position_ids[..., None].float() * _inv_freq(head_dim, float(theta), position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """`theta^(-2i/D)` for i < D/2, once per (D, theta, device): a decoding step asks for the tables of one
    position, and recomputing these small tensor ops each time cost ~1.5% of a step. Callers only read it; made
    outside inference mode, so a tensor first asked for under it still serves training."""
    with torch.inference_mode(False):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2]` -> `[-x2, x1]` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [..., T, D]` by tables `cos`, `sin` that broadcast to it (e.g. x `[B, H, T, D]` with tables
    `[B, 1, T, D]`, or x `[H, T, D]` with `[T, D]`)."""
    return x * cos + rotate_half(x) * sin
