"""Attention layers of the student: softmax, linear and hybrid, all with Llama's q/k/v/o projections.

One layer, two modes (as flash-linear-attention's layers): a chunked parallel form for training and prefill, a
recurrent form for decoding, with state kept per `layer_idx` in a `CodexMiniCache`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.hybrid import hybrid_attn
from ..ops.linear_attn import append_ones, linear_attn, normalise
from ..ops.rope import apply_rope
from .cache import CodexMiniCache
from .configuration import CodexMiniConfig
from .feature_maps import build_feature_map


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, Hkv, T, D]` -> `[B, Hkv * groups, T, D]` (each KV head serves `groups` query heads)."""
    if groups == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, groups, T, D).reshape(B, H * groups, T, D)


def initial_decay_logits(num_heads: int) -> torch.Tensor:
    """RetNet's spread of per-head decays, gamma_h = 1 - 2^(-5 - 3h/H): short and long memories; as logits."""
    h = torch.arange(num_heads, dtype=torch.float32)
    gamma = 1 - 2.0 ** (-5 - h * 3 / max(num_heads, 1))
    return torch.log(gamma / (1 - gamma))


class Attention(nn.Module):
    """Shared projections; subclasses differ in how q, k, v are mixed."""

    layer_type = "softmax"

    def __init__(self, config: CodexMiniConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.layer_num_attention_heads[layer_idx]
        self.num_key_value_heads = config.layer_num_key_value_heads[layer_idx]
        self.head_dim = config.head_dim
        bias = config.attention_bias
        d, h, kv, hd = config.hidden_size, self.num_heads, self.num_key_value_heads, self.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d, bias=bias)

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_key_value_heads

    def project(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        # The tables are [B, T, D], shared by all heads. `apply_rope` is looked up here at call time, so pruning's
        # tracer can swap it for the identity (`prune.width.rope_bypassed`).
        cos, sin = cos[:, None], sin[:, None]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def forward(self, x, cos, sin, attention_mask=None, cache: CodexMiniCache | None = None):
        """x `[B, T, hidden]`; attention_mask `[B, S]` (1 = token, 0 = padding) over past + current positions."""
        q, k, v = self.project(x, cos, sin)
        T = q.shape[2]
        if cache is not None:
            past = cache.layers[self.layer_idx]
            if "k" in past:
                k = torch.cat([past["k"], k], dim=2)
                v = torch.cat([past["v"], v], dim=2)
            past["k"], past["v"] = k, v
        S = k.shape[2]
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            i = torch.arange(T, device=x.device)[:, None] + (S - T)
            j = torch.arange(S, device=x.device)[None, :]
            key_ok = attention_mask[:, None, None, -S:].bool()
            # A padded query row would see no key at all and give NaN; letting it see itself keeps it finite.
            mask = ((j <= i) & key_ok) | (j == i)
        elif T > 1 and S > T:
            i = torch.arange(T, device=x.device)[:, None] + (S - T)
            mask = torch.arange(S, device=x.device)[None, :] <= i
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.groups > 1,
            scale=self.head_dim ** -0.5,
        )
        return self.output(o)


class LinearAttention(Attention):
    """Linear attention `o_i = phi(q_i) S_i / phi(q_i) z_i` with a fixed-size state (optionally decayed)."""

    layer_type = "linear"

    def __init__(self, config: CodexMiniConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        fd = config.hedgehog_dim
        self.feature_map_q = build_feature_map(config.feature_map, self.num_heads, self.head_dim, fd)
        self.feature_map_k = build_feature_map(config.feature_map, self.num_key_value_heads, self.head_dim, fd)
        if config.linear_decay:
            self.decay_logit = nn.Parameter(torch.empty(self.num_heads))
            self.reset_decay()
        else:
            self.decay_logit = None

    def reset_decay(self) -> None:
        with torch.no_grad():
            self.decay_logit.copy_(initial_decay_logits(self.num_heads))

    def log_decay(self):
        return None if self.decay_logit is None else F.logsigmoid(self.decay_logit.float())

    def features(self, q, k, v, attention_mask, T):
        """Feature-mapped q `[B,H,T,F]`, k `[B,H,T,F]` and `[v, 1]` `[B,H,T,D+1]`, padding zeroed."""
        fq = self.feature_map_q(q)
        fk = repeat_kv(self.feature_map_k(k), self.groups)
        v1 = append_ones(repeat_kv(v, self.groups))
        if attention_mask is not None:
            # Padding never enters the state: its key features and values are zeroed.
            keep = attention_mask[:, None, -T:, None].to(fk.dtype)
            fk, v1 = fk * keep, v1 * keep.to(v1.dtype)
        return fq, fk, v1

    def forward(self, x, cos, sin, attention_mask=None, cache: CodexMiniCache | None = None):
        q, k, v = self.project(x, cos, sin)
        T = q.shape[2]
        past = cache.layers[self.layer_idx] if cache is not None else {}
        fq, fk, v1 = self.features(q, k, v, attention_mask, T)
        # the recurrent form for a single decoding token, the chunked one otherwise
        o, state = linear_attn(fq, fk, v1, 1.0, past.get("state"), True, self.log_decay(),
                               chunk_size=self.config.linear_chunk_size)
        if cache is not None:
            past["state"] = state
        return self.output(normalise(o).to(x.dtype))


class HybridAttention(LinearAttention):
    """Sliding-window softmax over the last `sliding_window` tokens plus linear attention over all older ones,
    sharing one normaliser (as in LoLCATs; the formula and its reference are in `codexmini.ops.hybrid`). Keys leave
    the window into the linear state, so decoding keeps a window cache of fixed length plus a fixed-size state.
    """

    layer_type = "hybrid"

    def forward(self, x, cos, sin, attention_mask=None, cache: CodexMiniCache | None = None):
        q, k, v = self.project(x, cos, sin)
        B, H, T, D = q.shape
        w = self.config.sliding_window
        past = cache.layers[self.layer_idx] if cache is not None else {}
        fq, fk, v1 = self.features(q, k, v, attention_mask, T)
        k = repeat_kv(k, self.groups)
        valid = (attention_mask[:, -T:].bool() if attention_mask is not None
                 else torch.ones(B, T, dtype=torch.bool, device=x.device))
        if "win_k" in past:
            k_all = torch.cat([past["win_k"], k], dim=2)
            fk_all = torch.cat([past["win_fk"], fk], dim=2)
            v1_all = torch.cat([past["win_v1"], v1], dim=2)
            valid_all = torch.cat([past["win_valid"], valid], dim=1)
        else:
            k_all, fk_all, v1_all, valid_all = k, fk, v1, valid
        o, state = hybrid_attn(q, k_all, fq, fk_all, v1_all, w, self.head_dim ** -0.5, past.get("state"),
                               self.log_decay(), valid_all, self.config.linear_chunk_size)
        if cache is not None:
            past.update(state=state, win_k=k_all[:, :, -w:], win_fk=fk_all[:, :, -w:],
                        win_v1=v1_all[:, :, -w:], win_valid=valid_all[:, -w:])
        return self.output(o.to(x.dtype))


ATTENTION_CLASSES = {"softmax": Attention, "linear": LinearAttention, "hybrid": HybridAttention}
