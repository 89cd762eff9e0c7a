"""Decoding state of a CodexMini model, one entry per layer.

- softmax layers keep keys and values `[B, H, S, D]` (grows with the context);
- linear layers keep one state `[B, H, F, D + 1]` (the extra column is the normaliser); it never grows;
- hybrid layers keep the last `sliding_window` keys/values/features plus a linear state.
"""

from __future__ import annotations

import torch


class CodexMiniCache:
    """Per-layer tensors plus the number of positions seen so far (padding included)."""

    def __init__(self, num_layers: int):
        self.layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of the chosen beams."""
        for layer in self.layers:
            for name, t in layer.items():
                layer[name] = t.index_select(0, beam_idx.to(t.device))

    def nbytes(self, layer_idx: int | None = None) -> int:
        """Bytes held by one layer's state (or all layers)."""
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        return sum(t.numel() * t.element_size() for layer in layers for t in layer.values())

    def __len__(self) -> int:
        return len(self.layers)
