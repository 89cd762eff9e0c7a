"""Attention layers of the student: softmax, linear and hybrid, all with Llama's q/k/v/o projections.

One layer, two modes (as flash-linear-attention's layers): a chunked parallel form for training and prefill, a
recurrent form for decoding, with state kept per `layer_idx` in a `CodexMiniCache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import CodexMiniCache
from .configuration import CodexMiniConfig
from .feature_maps import build_feature_map
from .ops import chunk_linear_attn, recurrent_linear_attn

# Keeps linear-attention outputs finite where a relu feature map gives an all-zero normaliser.
NORMALISER_EPS = 1e-6


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, H, T, D]`, cos/sin `[B, T, D]`."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


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
        v = repeat_kv(v, self.groups)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        if attention_mask is not None:
            # Padding never enters the state: its key features and values are zeroed.
            keep = attention_mask[:, None, -T:, None].to(fk.dtype)
            fk, v1 = fk * keep, v1 * keep.to(v1.dtype)
        return fq, fk, v1

    def mix(self, fq, fk, v1, state):
        """Run the right kernel: recurrent for a single decoding token, chunked otherwise."""
        if fq.shape[2] == 1:
            return recurrent_linear_attn(fq, fk, v1, 1.0, state, True, self.log_decay())
        return chunk_linear_attn(fq, fk, v1, 1.0, state, True, self.log_decay(),
                                 chunk_size=self.config.linear_chunk_size)

    def forward(self, x, cos, sin, attention_mask=None, cache: CodexMiniCache | None = None):
        q, k, v = self.project(x, cos, sin)
        T = q.shape[2]
        past = cache.layers[self.layer_idx] if cache is not None else {}
        fq, fk, v1 = self.features(q, k, v, attention_mask, T)
        o, state = self.mix(fq, fk, v1, past.get("state"))
        if cache is not None:
            past["state"] = state
        o = o.float()
        o = o[..., :-1] / (o[..., -1:] + NORMALISER_EPS)
        return self.output(o.to(x.dtype))


class HybridAttention(LinearAttention):
    """Sliding-window softmax over the last `sliding_window` tokens plus linear attention over all older ones.

    As in LoLCATs, both parts share one normaliser:
    `o_i = (sum_win exp(s_ij - m_i) v_j + sum_old phi(q_i).phi(k_j) v_j) / (sum_win exp(s_ij - m_i) + sum_old phi.phi)`
    with `m_i` the row maximum over the window. Keys leave the window into the linear state, so decoding keeps a
    window cache of fixed length plus a fixed-size state.
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
        wc = k_all.shape[2] - T  # tokens carried over in the window cache (<= w)

        # Linear part: query i sees the keys at combined index <= wc + i - w. Left-padding the combined keys by w
        # lines key (wc + i - w) up with query i, so a plain causal linear attention over the aligned keys does it.
        fk_al = F.pad(fk_all, (0, 0, w, 0))[:, :, wc:wc + T]
        v1_al = F.pad(v1_all, (0, 0, w, 0))[:, :, wc:wc + T]
        o_lin, state = self.mix(fq, fk_al, v1_al, past.get("state"))

        num, den = self.window_softmax(q, k_all, v1_all[..., :-1], valid_all, wc, w)
        o = (num + o_lin[..., :-1].float()) / (den + o_lin[..., -1:].float() + NORMALISER_EPS)
        if cache is not None:
            past.update(state=state, win_k=k_all[:, :, -w:], win_fk=fk_all[:, :, -w:],
                        win_v1=v1_all[:, :, -w:], win_valid=valid_all[:, -w:])
        return self.output(o.to(x.dtype))

    def window_softmax(self, q, k_all, v_all, valid_all, wc, w):
        """Unnormalised sliding-window softmax, blocked so memory is O(T * w), not O(T^2).

        q `[B,H,T,D]`; k_all/v_all `[B,H,wc+T,D]`. Returns numerator `[B,H,T,D]` and denominator `[B,H,T,1]`.
        """
        B, H, T, D = q.shape
        if T == 1:
            return self._window_softmax_decode(q, k_all, v_all, valid_all, w)
        nb = math.ceil(T / w)
        # Extended key index = combined index + (w - wc): query i then sits at extended index i + w and sees
        # extended keys (i, i + w]. Query block b needs extended keys [b*w, b*w + 2w).
        front, back = w - wc, nb * w - T
        k_ext = F.pad(k_all.float(), (0, 0, front, back))
        v_ext = F.pad(v_all.float(), (0, 0, front, back))
        ok_ext = F.pad(valid_all, (front, back), value=False)
        kb = k_ext.unfold(2, 2 * w, w).transpose(-1, -2)  # [B, H, nb, 2w, D]
        vb = v_ext.unfold(2, 2 * w, w).transpose(-1, -2)
        okb = ok_ext.unfold(1, 2 * w, w)[:, None, :, None, :]  # [B, 1, nb, 1, 2w]
        qb = F.pad(q.float(), (0, 0, 0, back)).reshape(B, H, nb, w, D)
        scores = (qb @ kb.transpose(-1, -2)) * self.head_dim ** -0.5  # [B, H, nb, w, 2w]
        r = torch.arange(w, device=q.device)[:, None]
        c = torch.arange(2 * w, device=q.device)[None, :]
        allowed = (c > r) & (c <= r + w) & okb
        scores = scores.masked_fill(~allowed, float("-inf"))
        m = scores.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with nothing to attend to
        a = torch.exp(scores - m)
        num = (a @ vb).reshape(B, H, nb * w, D)[:, :, :T]
        den = a.sum(-1).reshape(B, H, nb * w, 1)[:, :, :T]
        return num, den


    def _window_softmax_decode(self, q, k_all, v_all, valid_all, w):
        """Fast path for one decoding token: its window is simply the last `w` combined keys."""
        k, v, ok = k_all[:, :, -w:].float(), v_all[:, :, -w:].float(), valid_all[:, None, None, -w:]
        scores = (q.float() @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # [B, H, 1, <=w]
        scores = scores.masked_fill(~ok, float("-inf"))
        m = scores.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        a = torch.exp(scores - m)
        return a @ v, a.sum(-1, keepdim=True)


ATTENTION_CLASSES = {"softmax": Attention, "linear": LinearAttention, "hybrid": HybridAttention}
