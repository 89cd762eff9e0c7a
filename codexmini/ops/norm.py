"""RMSNorm, as Llama computes it."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dim.

    Normalised in fp32 (as Llama does) so bf16 activations keep their precision here; the result is cast back to
    x's dtype before the weight multiplies it.

    Args:
        x: `[..., hidden]`.
        weight: `[hidden]`.
        eps: added to the mean square.
    """
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
