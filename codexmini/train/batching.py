"""Which blocks each step trains on: a pure function of (step, seed), so resume and every process agree."""

from __future__ import annotations

import torch


def batch_indices(step: int, n_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global batch `[batch_size]` of block indices for `step`: epochs are seeded permutations, so any step is
    reproducible without replaying the ones before it. With fewer blocks than a batch, every block, permuted."""
    per_epoch = max(n_blocks // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[offset * batch_size:(offset + 1) * batch_size] if n_blocks >= batch_size else perm


def process_slice(global_idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's share of a global batch (strided, so the shares differ by at most one block)."""
    return global_idx[rank::world]


def micro_batches(idx: torch.Tensor, batch_size: int, grad_accum: int, world: int) -> tuple[torch.Tensor, ...]:
    """Split a process's share into the micro-batches accumulated into one optimizer step."""
    micro = batch_size // grad_accum // world or 1
    return idx.split(micro)
