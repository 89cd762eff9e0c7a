"""Distillation losses between student and teacher next-token distributions.

Every divergence is computed per token in fp32 and averaged over the tokens that count (`mask`). To keep memory
bounded with 50k-150k vocabularies, `chunked_kd_loss` takes hidden states and the two output heads and turns only
`chunk_size` positions at a time into logits, so the full `[B, T, V]` fp32 logits of both models never coexist.

Conventions (p = teacher, q = student, both softened by the temperature):
- forward_kl:  KL(p || q)                                (mode-covering, the classic Hinton loss)
- reverse_kl:  KL(q || p)                                (mode-seeking, MiniLLM)
- jsd:         beta KL(p || m) + (1-beta) KL(q || m),  m = beta p + (1-beta) q   (generalized JSD, GKD)
- skew_kl:     KL(p || alpha p + (1-alpha) q)           (DistiLLM)
- skew_reverse_kl: KL(q || alpha q + (1-alpha) p)       (DistiLLM)
Each is multiplied by T^2 so gradient magnitudes do not shrink as the temperature grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, from log-probabilities `[..., V]`."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a, log_b, weight_a: float):
    """log(w a + (1-w) b), computed stably in log space."""
    if weight_a <= 0:
        return log_b
    if weight_a >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1 - weight_a))


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
               temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-token divergence `[...]` between logits `[..., V]` (T^2-scaled)."""
    if kind not in LOSSES:
        raise ValueError(f"distill.loss {kind!r} is not one of {LOSSES}")
    if temperature <= 0:
        raise ValueError(f"distill.temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = _kl(log_p, log_q)
    elif kind == "reverse_kl":
        d = _kl(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        d = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    elif kind == "skew_kl":
        d = _kl(log_p, _log_mix(log_p, log_q, alpha))
    else:
        d = _kl(log_q, _log_mix(log_q, log_p, alpha))
    return d * temperature ** 2


def align_vocab(teacher_logits: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """Slice a teacher vocabulary that is only padded larger; the check that the tokenizers agree runs earlier."""
    if teacher_logits.shape[-1] == student_vocab:
        return teacher_logits
    if teacher_logits.shape[-1] > student_vocab:
        return teacher_logits[..., :student_vocab]
    raise ValueError(f"teacher vocabulary ({teacher_logits.shape[-1]}) is smaller than the student's "
                     f"({student_vocab}); they must share a tokenizer")


def chunked_kd_loss(student_hidden: torch.Tensor, student_head: Callable, teacher_hidden: torch.Tensor,
                    teacher_head: Callable, labels: torch.Tensor, *, kind: str = "forward_kl",
                    temperature: float = 1.0, kd_ratio: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                    chunk_size: int = 128) -> dict:
    """Mixed KD + cross-entropy loss over a sequence, `chunk_size` positions at a time.

    Args:
        student_hidden / teacher_hidden: final hidden states `[B, T, H_s]` / `[B, T, H_t]`.
        student_head / teacher_head: hidden -> logits `[..., V]` (the lm_head).
        labels: `[B, T]` token ids; position t predicts labels[:, t+1]; -100 is ignored.
        kd_ratio: weight of the KD term; (1 - kd_ratio) weighs the next-token cross-entropy.

    Returns: {"loss", "kd", "ce"} scalars (loss carries the gradient).
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"distill.kd_ratio must be in [0, 1], got {kd_ratio}")
    s_h, t_h = student_hidden[:, :-1], teacher_hidden[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    n = mask.sum().clamp(min=1)
    def chunk_terms(s_chunk, t_chunk, tgt, m):
        s_logits = student_head(s_chunk).float()
        kd = ce = s_logits.new_zeros(())
        if kd_ratio > 0:
            with torch.no_grad():
                t_logits = align_vocab(teacher_head(t_chunk).float(), s_logits.shape[-1])
            kd = (divergence(s_logits, t_logits, kind, temperature, beta, alpha) * m).sum()
        if kd_ratio < 1:
            ce = F.cross_entropy(s_logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
        return kd, ce

    kd_total = ce_total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, s_h.shape[1], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (s_h[:, sl], t_h[:, sl], targets[:, sl], mask[:, sl])
        if torch.is_grad_enabled() and s_h.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping them: memory stays O(chunk x V).
            kd, ce = checkpoint(chunk_terms, *args, use_reentrant=False)
        else:
            kd, ce = chunk_terms(*args)
        kd_total, ce_total = kd_total + kd, ce_total + ce
    kd, ce = kd_total / n, ce_total / n
    return {"loss": kd_ratio * kd + (1 - kd_ratio) * ce, "kd": kd.detach(), "ce": ce.detach()}
