"""Offline teacher: its next-token distributions cached on disk once, reused across epochs and runs.

Two ways to keep a `[V]` distribution in a few numbers per position (`distill.teacher_cache_mode`):

* `topk`: the k largest logits (fp16), their token ids (int32) and the log-sum-exp of the full row (fp32).
  `dense_logits` rebuilds a full-vocabulary row: the k kept logits exactly, and the probability mass outside the
  top k spread evenly over the other tokens. Exact where the distribution is largest, but biased: the tail's
  shape is lost, so a student learns a flatter tail than the teacher's.
* `sample`: k token ids drawn with replacement from the teacher's distribution (int32). The estimate
  p_hat(v) = count(v) / k is unbiased (E[p_hat] = p), so the forward-KL / cross-entropy gradient against it is an
  unbiased estimate of the gradient against the full distribution (Random-Sampling KD, as in "Sparse Logit
  Sampling"), for the same bytes as a top-k cache. It needs `loss: forward_kl` at temperature 1 (a temperature
  or another divergence of a sampled estimate is not unbiased).

Layout: `<root>/<key>/shard_<n>.safetensors`, one shard per `shard_blocks` consecutive blocks, each written
atomically on first use. `<key>` hashes the teacher (config, shapes, sampled weights), the token blocks, the mode
and k, so a different teacher, corpus or setting never reads a stale cache.
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


CACHE_MODES = ("topk", "sample")
# Logit of a token no draw hit: exp() of it is exactly 0 in fp32, and 0 * (floor - log q) stays 0 (no NaN).
ZERO_LOGIT = -1.0e4


def sample_pack(logits: torch.Tensor, k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """k draws with replacement from softmax(`logits [..., V]`): {"indices" int32 [..., k]}."""
    probs = torch.softmax(logits.float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, k, replacement=True, generator=generator)
    return {"indices": draws.reshape(*probs.shape[:-1], k).int()}


def sampled_logits(indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full `[..., V]` logits whose softmax is the draws' empirical distribution count(v) / k (exactly)."""
    k = indices.shape[-1]
    counts = torch.zeros(*indices.shape[:-1], vocab_size, dtype=torch.float32, device=indices.device)
    counts.scatter_add_(-1, indices.long(), torch.full(indices.shape, 1.0 / k, device=indices.device))
    return torch.where(counts > 0, counts.clamp(min=1e-30).log(), torch.full_like(counts, ZERO_LOGIT))


class SampledHead:
    """A 'teacher head' for `chunked_kd_loss`: the packed draws `[..., k]` -> logits of their empirical mass."""

    def __init__(self, k: int, vocab_size: int):
        self.k, self.vocab_size = k, vocab_size

    @staticmethod
    def pack(entry: dict[str, torch.Tensor]) -> torch.Tensor:
        return entry["indices"].float()  # token ids < 2**24 are exact in fp32

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        return sampled_logits(packed.long(), self.vocab_size)


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


def check_cache_settings(mode: str, k: int, loss: str, temperature: float) -> None:
    """Refuse cache settings that cannot work, naming the key (`validate` calls this before any work)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"distill.teacher_cache_mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
    if k < 1:
        raise ValueError(f"distill.teacher_top_k must be >= 1, got {k}")
    if mode == "sample" and (loss != "forward_kl" or temperature != 1.0):
        raise ValueError("distill.teacher_cache_mode=sample is unbiased only for distill.loss=forward_kl at "
                         f"distill.temperature=1 (got {loss} at {temperature}); use teacher_cache_mode=topk")


class TeacherLogitCache:
    """The teacher's next-token distributions for a fixed `[N, T]` set of token blocks (top-k logits or sampled
    token ids, see the module docstring), computed lazily shard by shard."""

    def __init__(self, root: str | Path, teacher, blocks: torch.Tensor, top_k: int, vocab_size: int,
                 shard_blocks: int = 32, batch_size: int = 4, mode: str = "topk", seed: int = 0):
        if mode not in CACHE_MODES:
            raise ValueError(f"distill.teacher_cache_mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
        if top_k < 1 or (mode == "topk" and top_k > vocab_size):
            raise ValueError(f"distill.teacher_top_k must be in [1, vocab size {vocab_size}], got {top_k}")
        self.teacher, self.blocks, self.k, self.vocab_size = teacher, blocks, top_k, vocab_size
        self.shard_blocks, self.batch_size, self.mode, self.seed = shard_blocks, batch_size, mode, seed
        blocks_hash = hashlib.sha256(blocks.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
        # A top-k cache keeps the key it always had, so caches written before sampling existed stay valid.
        parts = [teacher_fingerprint(teacher), blocks_hash, top_k, vocab_size] + ([mode, seed] if mode != "topk"
                                                                                  else [])
        key = hashlib.sha256(json.dumps(parts).encode())
        self.dir = Path(root) / key.hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "cache.json"
        if not meta.exists():
            write_atomic(meta, json.dumps({"mode": mode, "top_k": top_k, "vocab_size": vocab_size, "seed": seed,
                                           "blocks": list(blocks.shape), "blocks_sha256": blocks_hash,
                                           "shard_blocks": shard_blocks}, indent=1))
        self.head = TopKHead(top_k, vocab_size) if mode == "topk" else SampledHead(top_k, vocab_size)
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
        # Draws are seeded per shard, so a shard's content does not depend on which shards were made first.
        gen = torch.Generator().manual_seed(self.seed * 1000003 + n)
        with torch.no_grad():
            for batch in rows.split(self.batch_size):
                logits = self.teacher(input_ids=batch.to(device), use_cache=False).logits[..., :self.vocab_size]
                pack = topk_pack(logits, self.k) if self.mode == "topk" else sample_pack(logits.cpu(), self.k, gen)
                parts.append({k: v.cpu() for k, v in pack.items()})
        shard = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
        with atomic_path(path) as tmp:
            save_file(shard, str(tmp))
        self.computed += 1
        return shard

    def get(self, block_indices: torch.Tensor) -> torch.Tensor:
        """Packed teacher rows for `self.head`: `[len(block_indices), T, 2k+1]` (top-k) or `[..., T, k]`."""
        out, shards = [], {}
        for i in block_indices.tolist():
            n, r = divmod(int(i), self.shard_blocks)
            if n not in shards:
                shards[n] = self._shard(n)
            out.append(self.head.pack({k: v[r] for k, v in shards[n].items()}))
        return torch.stack(out)

    def fill(self) -> None:
        """Compute every missing shard now (e.g. once, before several runs share the cache)."""
        for n in range(math.ceil(len(self.blocks) / self.shard_blocks)):
            if not self._shard_path(n).exists():
                self._shard(n)
