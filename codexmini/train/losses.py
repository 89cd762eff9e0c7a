"""Plain training objectives any stage can hand to `fit`."""

from __future__ import annotations

import torch

from .loop import Batch, TrainContext


def next_token_loss(ctx: TrainContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy of any causal LM that computes its own loss from `labels` (HF convention: labels
    are the inputs, shifted inside the model; -100 is not scored). Materialises the full `[B, T, V]` logits,
    which is fine for small vocabularies and short blocks; distillation has its own chunked loss."""
    out = ctx.model(input_ids=batch.ids, labels=batch.labels, use_cache=False)
    return {"loss": out.loss}
