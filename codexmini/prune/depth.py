"""Depth pruning: score whole layers and keep the most important ones.

Block influence (ShortGPT): a layer whose output is nearly its input (cosine similarity close to 1) changes little
and is the first to go. Scores come from calibration data through `output_hidden_states`, so any HF causal LM works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def block_influence(model, calibration: torch.Tensor, batch_size: int = 4) -> list[float]:
    """`1 - cos(h_in, h_out)` per layer, averaged over calibration tokens `[N, T]`."""
    model.eval()
    totals, count = None, 0
    for start in range(0, len(calibration), batch_size):
        ids = calibration[start:start + batch_size].to(next(model.parameters()).device)
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        # hidden_states = (embeddings, output of layer 0, ..., output of the last layer). In HF models the last
        # entry is taken after the final norm, which inflates the last layer's score; that layer is kept anyway.
        scores = torch.stack([1 - F.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1).mean()
                              for i in range(len(hs) - 1)])
        totals = scores * len(ids) if totals is None else totals + scores * len(ids)
        count += len(ids)
    return (totals / count).tolist()


def select_layers(model, calibration: torch.Tensor, keep: int) -> list[int]:
    """Indices (ascending) of the `keep` layers with the highest block influence."""
    n = model.config.num_hidden_layers
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} layers; choose 1..{n}")
    scores = block_influence(model, calibration)
    return sorted(sorted(range(n), key=lambda i: scores[i], reverse=True)[:keep])


@torch.no_grad()
def contiguous_block(model, calibration: torch.Tensor, n: int, batch_size: int = 4) -> int:
    """Start of the `n` consecutive layers whose removal changes the hidden state least (Minitron / Gromov et al.):
    the block with the highest cosine similarity between its input and its output. The last layer stays."""
    layers = model.config.num_hidden_layers
    if not 1 <= n < layers:
        raise ValueError(f"cannot remove a block of {n} of {layers} layers; choose 1..{layers - 1}")
    model.eval()
    total = torch.zeros(layers - n)
    for start in range(0, len(calibration), batch_size):
        ids = calibration[start:start + batch_size].to(next(model.parameters()).device)
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for s in range(layers - n):  # blocks [s, s+n) never include the last layer (its output is normed)
            total[s] += F.cosine_similarity(hs[s].float(), hs[s + n].float(), dim=-1).mean() * len(ids)
    return int(total.argmax())
