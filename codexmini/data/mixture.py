"""Mixing domains: training blocks interleaved by weight, validation blocks kept per domain.

Weights are shares of training *tokens*: each domain is packed into its own `[N, T]` blocks first and the blocks
are interleaved (`datasets.interleave_datasets`, seeded), so a domain of long files and one of short samples get
the tokens their weights say, and no block straddles two domains.
"""

from __future__ import annotations

import torch


def interleave_blocks(blocks: dict[str, torch.Tensor], weights: dict[str, float], seed: int = 0,
                      stopping: str = "all_exhausted", max_blocks: int | None = None
                      ) -> tuple[torch.Tensor, list[str]]:
    """Interleave each domain's blocks `[N_d, T]` with probabilities proportional to `weights`.

    stopping: `all_exhausted` repeats the smaller domains until every block of every domain has been drawn once
        (the weights hold over the whole stream); `first_exhausted` stops when the first domain runs out (no
        block repeats, the stream is short when a domain is small).
    max_blocks: keep the first this many blocks of the stream.

    Returns (blocks `[N, T]`, the domain of each block).
    """
    names = list(blocks)
    if len(names) == 1:
        only = blocks[names[0]][:max_blocks] if max_blocks is not None else blocks[names[0]]
        return only, [names[0]] * len(only)
    import datasets

    total = float(sum(weights[n] for n in names))
    parts = [datasets.Dataset.from_dict({"domain": [d] * len(blocks[n]), "index": list(range(len(blocks[n])))})
             for d, n in enumerate(names)]
    mixed = datasets.interleave_datasets(parts, probabilities=[weights[n] / total for n in names], seed=seed,
                                         stopping_strategy=stopping)
    if max_blocks is not None and len(mixed) > max_blocks:
        mixed = mixed.select(range(max_blocks))
    domain = torch.tensor(mixed["domain"][:], dtype=torch.long)
    index = torch.tensor(mixed["index"][:], dtype=torch.long)
    offsets = torch.tensor([0] + [len(blocks[n]) for n in names[:-1]]).cumsum(0)
    stacked = torch.cat([blocks[n] for n in names])
    return stacked[offsets[domain] + index], [names[d] for d in domain.tolist()]


def round_robin(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every domain's blocks in one `[N, T]` tensor, taken in turn (block 0 of each domain, then block 1, ...), so
    that any prefix `val[:k]` (a trainer's `eval_blocks`) covers every domain."""
    tensors = [b for b in blocks.values() if len(b)]
    if not tensors:
        raise ValueError("no validation blocks in any domain")
    if len(tensors) == 1:
        return tensors[0]
    longest = max(len(b) for b in tensors)
    return torch.cat([b[j:j + 1] for j in range(longest) for b in tensors if j < len(b)])
