"""Evaluation that sees forgetting: perplexity per domain, and KL divergence from the teacher per domain.

Every stage calls this on the same held-out blocks (`DataBundle.val_domains`), so the report can show, domain by
domain, what distillation, pruning and quantization cost, including on domains no stage trained on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Rows of [rows, vocab] float32 logits handled at once in the KL sum: ~64 MB per tensor whatever the vocabulary.
_KL_CHUNK_ELEMENTS = 1 << 24


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """sum over positions of KL(teacher || student) = sum_v p_t (log p_t - log p_s), for logits `[..., V]`.

    Computed in row chunks in float32, so memory stays a few times one chunk instead of four copies of the full
    `[B, T, V]` tensor.
    """
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(t.device)
    rows = max(1, _KL_CHUNK_ELEMENTS // t.shape[-1])
    total = 0.0
    for start in range(0, len(t), rows):
        log_t = F.log_softmax(t[start:start + rows].float(), dim=-1)
        log_s = F.log_softmax(s[start:start + rows].float(), dim=-1)
        total += float((log_t.exp() * (log_t - log_s)).sum())
    return total


@torch.no_grad()
def evaluate_domains(model, data, teacher=None, batch_size: int = 8, progress: bool = False) -> dict[str, dict]:
    """Perplexity (and KL from the teacher) of `model` on each domain's held-out blocks.

    Args:
        model: any causal LM returning `.logits` (students, teachers, quantized students).
        data: a DataBundle (its `val_domains`) or a dict {domain: blocks `[N, T]`}.
        teacher: with a teacher sharing the tokenizer, the mean per-token KL(teacher || student) is added.
        batch_size: blocks per forward pass.

    Returns: {domain: {"ppl", "loss" (nats/token), "tokens", and "kl" (nats/token) with a teacher}}. The loss and
        KL are over the T-1 positions of each block that have a next token, as in `perplexity`.
    """
    domains = data.val_domains if hasattr(data, "val_domains") else dict(data)
    models = [model] + ([teacher] if teacher is not None else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    results = {}
    try:
        for name, blocks in domains.items():
            loss_sum, kl_total, count = 0.0, 0.0, 0
            for start in tqdm(range(0, len(blocks), batch_size), desc=f"eval {name}", disable=not progress,
                              leave=False):
                ids = blocks[start:start + batch_size]
                logits = _logits(model, ids)[:, :-1]
                targets = ids[:, 1:].to(logits.device)
                loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
                count += targets.numel()
                if teacher is not None:
                    teacher_logits = _logits(teacher, ids)[:, :-1]
                    if teacher_logits.shape[-1] != logits.shape[-1]:
                        raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} != student's "
                                         f"{logits.shape[-1]}: KL needs the tokenizer they share")
                    kl_total += kl_sum(teacher_logits, logits)
                    del teacher_logits
                del logits
            mean = loss_sum / max(count, 1)
            results[name] = {"ppl": math.exp(min(mean, 50.0)), "loss": mean, "tokens": count}
            if teacher is not None:
                results[name]["kl"] = kl_total / max(count, 1)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return results
