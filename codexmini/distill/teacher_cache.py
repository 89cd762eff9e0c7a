"""Offline teacher: its top-k next-token logits cached on disk once, reused across epochs and runs.

For each position the cache keeps the k largest logits (fp16), their token ids (int32) and the log-sum-exp of the
full row (fp32). `dense_logits` rebuilds a full-vocabulary row from them: the k kept logits exactly, and the
probability mass outside the top k spread evenly over the other tokens. Every divergence in `losses` then works
unchanged on the rebuilt rows, and the teacher's distribution is exact wherever it is largest.

Layout: `<root>/<key>/shard_<n>.safetensors`, one shard per `shard_blocks` consecutive blocks, each written
atomically on first use. `<key>` hashes the teacher (config, shapes, sampled weights), the token blocks and k, so
a different teacher or corpus never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from ..files import atomic_path, write_atomic


def topk_pack(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-k of `[..., V]` logits: {"values" fp16, "indices" int32, "lse" fp32}."""
    logits = logits.float()
    values, indices = logits.topk(k, dim=-1)
    return {"values": values.half(), "indices": indices.int(), "lse": torch.logsumexp(logits, dim=-1)}


def dense_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full `[..., V]` fp32 logits from a top-k pack (log-probabilities up to a constant).

    The tail's mass 1 - sum(top-k probabilities) is shared evenly by the V - k other tokens.
    """
    values = values.float()
    k = values.shape[-1]
    log_top = values - lse[..., None]
    top_mass = log_top.exp().sum(-1).clamp(max=1.0)
    tail = (1.0 - top_mass).clamp(min=1e-12).log() - math.log(max(vocab_size - k, 1))
    out = (tail + lse)[..., None].expand(*values.shape[:-1], vocab_size).clone()
    return out.scatter_(-1, indices.long(), values)


class TopKHead:
    """A 'teacher head' for `chunked_kd_loss`: the packed hidden `[..., 2k+1]` (values, ids, lse) -> dense logits."""

    def __init__(self, k: int, vocab_size: int):
        self.k, self.vocab_size = k, vocab_size

    @staticmethod
    def pack(entry: dict[str, torch.Tensor]) -> torch.Tensor:
        # Token ids < 2**24 are exact in fp32, so one float tensor carries the three parts through the chunking.
        return torch.cat([entry["values"].float(), entry["indices"].float(), entry["lse"].float()[..., None]], -1)

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        k = self.k
        return dense_logits(packed[..., :k], packed[..., k:2 * k].long(), packed[..., 2 * k], self.vocab_size)


def teacher_fingerprint(teacher) -> str:
    """A cheap, stable hash of a teacher: its config, parameter names/shapes and a sample of every tensor."""
    h = hashlib.sha256(teacher.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(teacher.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        sample = flat[:: max(flat.numel() // 4096, 1)][:4096]
        h.update(sample.float().cpu().numpy().tobytes() if sample.is_floating_point() else
                 sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class TeacherLogitCache:
    """Top-k teacher logits for a fixed `[N, T]` set of token blocks, computed lazily shard by shard."""

    def __init__(self, root: str | Path, teacher, blocks: torch.Tensor, top_k: int, vocab_size: int,
                 shard_blocks: int = 32, batch_size: int = 4):
        if top_k < 1 or top_k > vocab_size:
            raise ValueError(f"distill.teacher_top_k must be in [1, vocab size {vocab_size}], got {top_k}")
        self.teacher, self.blocks, self.k, self.vocab_size = teacher, blocks, top_k, vocab_size
        self.shard_blocks, self.batch_size = shard_blocks, batch_size
        blocks_hash = hashlib.sha256(blocks.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
        key = hashlib.sha256(json.dumps([teacher_fingerprint(teacher), blocks_hash, top_k, vocab_size]).encode())
        self.dir = Path(root) / key.hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "cache.json"
        if not meta.exists():
            write_atomic(meta, json.dumps({"top_k": top_k, "vocab_size": vocab_size, "blocks": list(blocks.shape),
                                           "blocks_sha256": blocks_hash, "shard_blocks": shard_blocks}, indent=1))
        self.head = TopKHead(top_k, vocab_size)
        self.computed = 0  # shards computed by this object (0 when everything came from disk)

    def _shard_path(self, n: int) -> Path:
        return self.dir / f"shard_{n:05d}.safetensors"

    def _shard(self, n: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        path = self._shard_path(n)
        if path.exists():
            return load_file(str(path))
        device = next(self.teacher.parameters()).device
        rows = self.blocks[n * self.shard_blocks:(n + 1) * self.shard_blocks]
        parts = []
        with torch.no_grad():
            for batch in rows.split(self.batch_size):
                logits = self.teacher(input_ids=batch.to(device), use_cache=False).logits[..., :self.vocab_size]
                parts.append({k: v.cpu() for k, v in topk_pack(logits, self.k).items()})
        shard = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
        with atomic_path(path) as tmp:
            save_file(shard, str(tmp))
        self.computed += 1
        return shard

    def get(self, block_indices: torch.Tensor) -> torch.Tensor:
        """Packed teacher rows `[len(block_indices), T, 2k+1]` for `TopKHead`."""
        out, shards = [], {}
        for i in block_indices.tolist():
            n, r = divmod(int(i), self.shard_blocks)
            if n not in shards:
                shards[n] = self._shard(n)
            out.append(TopKHead.pack({k: v[r] for k, v in shards[n].items()}))
        return torch.stack(out)

    def fill(self) -> None:
        """Compute every missing shard now (e.g. once, before several runs share the cache)."""
        for n in range(math.ceil(len(self.blocks) / self.shard_blocks)):
            if not self._shard_path(n).exists():
                self._shard(n)
