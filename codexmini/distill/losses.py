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


class _FusedLinearForwardKL(torch.autograd.Function):
    """Forward KL (+ cross-entropy) through linear heads, a chunk of rows at a time, gradient computed in forward.

    The fast path of `chunked_kd_loss` for the common case (forward_kl, bias-free linear heads): the student's
    logits are never kept or recomputed, and the gradient is the closed form
    d/ds [T^2 KL(p_T || q_T)] = T (q_T - p_T),  d/ds CE = softmax(s) - onehot.
    `chunked_kd_loss(..., fused=False)` is the autograd reference it is tested against.
    """

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, targets, mask, kd_ratio, temperature, chunk_size):
        # The loss and its closed-form gradient are computed in fp32 whatever autocast is active outside.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _FusedLinearForwardKL._forward(ctx, hidden, weight, t_hidden, t_weight, targets, mask,
                                                  kd_ratio, temperature, chunk_size)

    @staticmethod
    def _forward(ctx, hidden, weight, t_hidden, t_weight, targets, mask, kd_ratio, temperature, chunk_size):
        # hidden [N, H], weight [V, H], t_hidden [N, Ht], t_weight [Vt, Ht], targets/mask [N]
        V = weight.shape[0]
        w = weight.float()
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros_like(w)
        kd_sum = hidden.new_zeros((), dtype=torch.float32)
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        T = temperature
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl].float()
            m = mask[sl].float()[:, None]
            s = h @ w.t()
            g = torch.zeros_like(s)
            if kd_ratio > 0:
                t = align_vocab(t_hidden[sl].float() @ t_weight.float().t(), V)
                log_q = F.log_softmax(s / T if T != 1 else s, dim=-1)
                log_p = F.log_softmax(t / T if T != 1 else t, dim=-1)
                p = log_p.exp()
                kd_sum += ((p * (log_p - log_q)).sum(-1, keepdim=True) * m).sum() * T * T
                g += (kd_ratio * T) * (log_q.exp() - p) * m
            if kd_ratio < 1:
                log_q1 = log_q if (kd_ratio > 0 and T == 1) else F.log_softmax(s, dim=-1)
                tgt = targets[sl].clamp(min=0)[:, None]
                ce_sum += (-log_q1.gather(1, tgt) * m).sum()
                g += (1 - kd_ratio) * log_q1.exp() * m
                g.scatter_add_(1, tgt, -(1 - kd_ratio) * m)
            grad_h[sl] = g @ w
            grad_w += g.t() @ h
        n = mask.sum().clamp(min=1).float()
        ctx.save_for_backward(grad_h / n, grad_w / n)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        loss = (kd_ratio * kd_sum + (1 - kd_ratio) * ce_sum) / n
        return loss, kd_sum / n, ce_sum / n

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype),
                None, None, None, None, None, None, None)


def _linear_weight(head):
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        return head.weight
    return None


def chunked_kd_loss(student_hidden: torch.Tensor, student_head: Callable, teacher_hidden: torch.Tensor,
                    teacher_head: Callable, labels: torch.Tensor, *, kind: str = "forward_kl",
                    temperature: float = 1.0, kd_ratio: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                    chunk_size: int = 128, fused: bool = True) -> dict:
    """Mixed KD + cross-entropy loss over a sequence, `chunk_size` positions at a time.

    Args:
        student_hidden / teacher_hidden: final hidden states `[B, T, H_s]` / `[B, T, H_t]`.
        student_head / teacher_head: hidden -> logits `[..., V]` (the lm_head module, or any callable).
        fused: for forward_kl with bias-free `nn.Linear` heads, use the fused closed-form gradient (faster: no
            logits kept or recomputed); otherwise, or with fused=False, autograd through checkpointed chunks.
        labels: `[B, T]` token ids; position t predicts labels[:, t+1]; -100 is ignored.
        kd_ratio: weight of the KD term; (1 - kd_ratio) weighs the next-token cross-entropy.

    Returns: {"loss", "kd", "ce"} scalars (loss carries the gradient).
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"distill.kd_ratio must be in [0, 1], got {kd_ratio}")
    s_h, t_h = student_hidden[:, :-1], teacher_hidden[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    w_s, w_t = _linear_weight(student_head), _linear_weight(teacher_head)
    if fused and kind == "forward_kl" and w_s is not None and (w_t is not None or kd_ratio == 0):
        H = s_h.shape[-1]
        t_flat = t_h.reshape(-1, t_h.shape[-1])
        # Rows of a chunk: chunk_size positions of every sequence, as in the reference path.
        loss, kd, ce = _FusedLinearForwardKL.apply(
            s_h.reshape(-1, H), w_s, t_flat, w_t if w_t is not None else w_s, targets.reshape(-1),
            mask.reshape(-1), kd_ratio, temperature, chunk_size * s_h.shape[0])
        return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}
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
