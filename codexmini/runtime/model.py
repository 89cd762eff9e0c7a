"""The on-device runtime: loads a .cmx file and runs prefill and token-by-token decode, one sequence at a time.

It depends only on torch, safetensors, tokenizers, `codexmini.ops` and the .cmx format module (so the artifact
stands on its own, without transformers). Its numerics are the PyTorch model's own functions from `codexmini.ops`
(feature maps, linear and hybrid attention, RoPE, RMSNorm, dequantization); what is the runtime's is the rest:
memory-mapped weights, per-session caches and states, and the dispatch to the fused C++ kernels
(`csrc/cmx_kernels.cpp`, each tested against the ops function it replaces). It is tested against the PyTorch model
(logits, greedy generation) for every layer type.

Per layer type, the decoding state:
- softmax: a KV cache sized per prompt and grown in place (by quarters), so each token appends instead of copying;
- linear: a fixed-size state `[H, F, D+1]` (the last column accumulates the normaliser);
- hybrid: a window of the last `sliding_window` keys/values plus the linear state of every older key.
"""

from __future__ import annotations

import functools

import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cmx import EMBED, CmxFile, read_cmx
from ..ops.feature_maps import feature_map, feature_map_dim
from ..ops.hybrid import hybrid_attn
from ..ops.layouts import dequantize
from ..ops.linear_attn import NORMALISER_EPS, append_ones, linear_attn, normalise
from ..ops.norm import rms_norm
from ..ops.rope import apply_rope, rotary_cos_sin
from .inputs import check_prompt_length, check_token_ids, load_tokenizer, max_positions
from .kernels import (CmxConcatLinear, CmxGroupLinear, CmxInt8Linear, make_fused_linear, make_linear, resolve_act,
                      resolve_mode)

@functools.cache
def decode_rows() -> int:
    """How many rows codexmini's int kernels take as decoding (each row computed exactly as it is alone, every
    weight row read once per eight of them); more rows are a prompt to them, which dequantizes every weight tile:
    right for hundreds of rows, 2-4x slower per row for a few dozen. So a batched decode step calls them on at most
    this many rows at a time (`_by_rows`). The number is the kernels' own (`gemv_rows()`)."""
    from . import native

    ext = native.load()
    return ext.gemv_rows() if ext is not None else 1


# --------------------------------------------------------------------------- embedding rows
class FileRows:
    """A table looked up a row at a time, its rows read from the file (`os.preadv`) rather than mapped. Decoding
    needs only the rows of the tokens it sees, but through a mapping each lookup made the kernel map up to 64 KiB
    of the file around it (fault-around): a few thousand tokens made all of SmolLM2's 57 MB fp16 table resident
    in the process. The OS page cache still keeps the rows read recently."""

    def __init__(self, path: Path, offset: int, shape, dtype: torch.dtype):
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self.offset, self.shape, self.dtype = offset, torch.Size(shape), dtype
        self.row_bytes = self.shape[1] * torch.empty(0, dtype=dtype).element_size()

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        rows, inverse = torch.unique(ids, return_inverse=True) if ids.numel() > 1 else (ids, None)
        if rows.numel() and not (0 <= int(rows[0]) and int(rows[-1]) < self.shape[0]):
            raise IndexError(f"token id outside the vocabulary of {self.shape[0]}: {rows[0]}..{rows[-1]}")
        n = self.row_bytes
        buf = bytearray(rows.numel() * n)
        view = memoryview(buf)
        for i, r in enumerate(rows.tolist()):
            if os.preadv(self._fd, [view[i * n:(i + 1) * n]], self.offset + r * n) != n:
                raise OSError(f"short read of embedding row {r}: the file changed since it was loaded")
        table = torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).reshape(rows.numel(), self.shape[1])
        return table if inverse is None else table[inverse]


def _by_rows(call, x: torch.Tensor, residual: torch.Tensor | None = None, kernel=None) -> torch.Tensor:
    """`call(x[, residual])` on pieces of at most `decode_rows()` rows when `kernel` (default: `call`) is one of
    codexmini's int kernels; in one call otherwise (float and torch kernels take any rows)."""
    rest = () if residual is None else (residual,)
    if not isinstance(kernel or call, (CmxGroupLinear, CmxInt8Linear, CmxConcatLinear)):
        return call(x, *rest)
    rows = decode_rows()
    if x.shape[0] <= rows:
        return call(x, *rest)
    return torch.cat([call(x[i:i + rows], *(r[i:i + rows] for r in rest)) for i in range(0, x.shape[0], rows)])


def _direct(call, x: torch.Tensor, residual: torch.Tensor | None = None, kernel=None) -> torch.Tensor:
    return call(x) if residual is None else call(x, residual)


# --------------------------------------------------------------------------- state
def _store(st: dict, name: str, value: torch.Tensor) -> None:
    """Keep a session tensor in the buffer it already has (copied in place when the shape matches). A new
    tensor per prefill chunk would land among that chunk's temporaries and pin the heap around them: the
    allocator could then not reuse or return the space (measured: 20-60 MB more peak memory at 4k tokens)."""
    old = st.get(name)
    if old is not None and old.shape == value.shape:
        old.copy_(value)
    else:
        st[name] = value.clone()  # never a view: it would keep the whole chunk's tensor alive


@dataclass
class Session:
    """Everything a sequence has built up: position, token ids and per-layer caches / states."""

    pos: int = 0
    tokens: list[int] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values()
                   if torch.is_tensor(t))


@dataclass
class Checkpoint:
    """The linear / hybrid layers' states of a session after its first `pos` tokens (None for softmax layers).
    With the KV caches of any session that holds those tokens, `Runtime.fork` continues from there: linear states
    cannot be cut back to a shorter prefix the way a KV cache can, so prefix reuse keeps these at chosen points."""

    pos: int
    layers: list[dict | None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer for t in layer.values())


KV_DTYPES = {"float16": torch.float16, "float32": torch.float32}
KV_DTYPE_CHOICES = ("auto", *KV_DTYPES)  # what `kv_dtype` / `--kv-dtype` take


def resolve_kv_dtype(kv_dtype: str, vector_attention: bool) -> torch.dtype:
    """The KV caches' dtype: "auto" is float16 where codexmini's kernels attend in AVX-512 (`vector_attention`: they
    widen 16 keys' or values' elements an instruction as they read them: half the bytes a decoding step reads from
    the caches, and half their memory, as llama.cpp's default f16 caches), float32 elsewhere (torch's attention
    would widen the whole cache every step, the kernels' plain C++ one value at a time); "float32" keeps the
    runtime's logits within float rounding of the PyTorch model's."""
    if kv_dtype == "auto":
        return torch.float16 if vector_attention else torch.float32
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPE_CHOICES)}; got {kv_dtype!r}")
    return KV_DTYPES[kv_dtype]


class Layer:
    def __init__(self, f: CmxFile, i: int, mode: str, act_dtype, kv_dtype: torch.dtype = torch.float32):
        c, t = f.config, f.tensors
        p = f"model.layers.{i}."
        self.type = c["layer_types"][i]
        self.h, self.kv = c["layer_num_attention_heads"][i], c["layer_num_key_value_heads"][i]
        self.hd, self.eps, self.window = c["head_dim"], c["rms_norm_eps"], c.get("sliding_window", 64)
        self.groups = self.h // self.kv
        self.kv_dtype = kv_dtype
        self.in_norm = t[p + "input_layernorm.weight"].float()
        self.post_norm = t[p + "post_attention_layernorm.weight"].float()
        names = {n: p + n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        # q/k/v and gate/up read the same input: one fused kernel each when their schemes agree.
        self.qkv = make_fused_linear(t, [names[f"self_attn.{n}_proj"] for n in "qkv"], f.schemes, mode, act_dtype)
        self.gate_up = make_fused_linear(t, [names["mlp.gate_proj"], names["mlp.up_proj"]], f.schemes, mode,
                                         act_dtype)
        lin = {n: make_linear(t, full, f.schemes.get(full), mode, act_dtype) for n, full in names.items()
               if not (self.qkv and n.startswith("self_attn.") and n != "self_attn.o_proj")
               and not (self.gate_up and n in ("mlp.gate_proj", "mlp.up_proj"))}
        self.o, self.down = lin["self_attn.o_proj"], lin["mlp.down_proj"]
        self.q, self.k, self.v = (lin.get(f"self_attn.{n}_proj") for n in "qkv")
        self.gate, self.up = lin.get("mlp.gate_proj"), lin.get("mlp.up_proj")
        self.linears = list(lin.values()) + [k for k in (self.qkv, self.gate_up) if k is not None]
        # codexmini's kernels also fuse the small steps (norms, rotary, silu * up, one-token attention); the ops
        # functions used below are their reference (and serve the other kernel modes).
        from . import native

        self.ext = native.load() if mode == "cmx" else None
        self.split_qkv = (self.h * self.hd, self.kv * self.hd, self.kv * self.hd)
        self._step = self._step_args()
        if self.type != "softmax":
            self.feature_map = c["feature_map"]
            # hedgehog's weights in fp32, once: for the ops function and the fused kernel alike
            self.fm_w = {s: t[p + f"self_attn.feature_map_{s}.weight"].float().contiguous() for s in "qk"} \
                if self.feature_map == "hedgehog" else None
            d = t.get(p + "self_attn.decay_logit")
            self.log_decay = F.logsigmoid(d.float()) if d is not None else None
            self.decay_mult = torch.exp(self.log_decay) if d is not None else torch.empty(0)
            self.n_features = feature_map_dim(self.feature_map, self.hd,
                                              self.fm_w["k"].shape[-1] if self.fm_w else None)
            self.chunk = c.get("linear_chunk_size", 64)

    def _step_args(self) -> tuple | None:
        """The weights a decoding step of this layer hands `ext.softmax_step` in one call (q, k, v, o, gate, up,
        down, all panels of one width, q/k/v and gate/up fused), or None: then `forward_rows` makes the calls."""
        if self.ext is None or self.type != "softmax":
            return None
        fused = [self.qkv, self.gate_up]
        if not all(isinstance(k, CmxConcatLinear) for k in fused) or [len(k.parts) for k in fused] != [3, 2]:
            return None
        parts = [*self.qkv.parts, self.o, *self.gate_up.parts, self.down]
        if not all(isinstance(k, CmxGroupLinear) and k.panels and k.bits == parts[0].bits for k in parts):
            return None
        return [k.packed for k in parts], [k.scale for k in parts], [k.zero for k in parts], parts[0].bits

    def _rep(self, x):  # [KV, T, D] -> [H, T, D]
        return x if self.groups == 1 else x.repeat_interleave(self.groups, dim=0)

    def _phi(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """The layer's feature map of queries (`side` "q", x `[H, T, D]`) or keys ("k", `[KV, T, D]`)."""
        return feature_map(self.feature_map, x, self.fm_w[side] if self.fm_w else None)

    def forward(self, x: torch.Tensor, cos, sin, st: dict) -> torch.Tensor:
        """T tokens of one sequence (x `[T, d]`) after what `st` holds: `forward_segments` with one segment."""
        return self.forward_segments(x, cos, sin, [(0, x.shape[0], st)])

    def forward_rows(self, x: torch.Tensor, cos, sin, sts: list[dict]) -> torch.Tensor:
        """One token for each of B sequences: row i of x `[B, d]` continues the state `sts[i]`, at its own position
        (cos / sin `[B, D]`). The linear layers take all B rows in one call (one pass over each weight serves every
        sequence); attention runs per sequence, through the same call a single sequence's decode step makes."""
        B, ext = x.shape[0], self.ext
        if self._step is not None and B <= decode_rows():  # the same calls, made in one (`_step_args`)
            ns = self._cache_slots(sts, [1] * B)
            out = ext.softmax_step(x, self.in_norm, self.post_norm, self.eps, *self._step, [st["k"] for st in sts],
                                   [st["v"] for st in sts], ns, cos, sin, self.h, self.kv, self.hd, self.hd ** -0.5)
            for st, n in zip(sts, ns):
                st["n"] = n + 1
            return out
        a = ext.rms_norm(x, self.in_norm, self.eps) if ext else rms_norm(x, self.in_norm, self.eps)
        rows = []
        if ext:
            qkv = self._qkv(a, _by_rows)
            ext.rope_(qkv, cos, sin, self.h + self.kv, self.hd)
            if self.type == "softmax":  # every session's heads in one call
                rows.append(self._softmax_segments(qkv, sts, list(range(B + 1))))
            else:
                rows.append(self._recurrent_rows(*qkv.split(self.split_qkv, dim=-1), sts, list(range(B + 1))))
        else:
            q, k, v = _by_rows(self.qkv, a).split(self.split_qkv, dim=-1) if self.qkv else \
                (_by_rows(self.q, a), _by_rows(self.k, a), _by_rows(self.v, a))
            # the B rows take the place of a prompt's T positions: the tables hold each row's own position
            q = apply_rope(q.reshape(B, self.h, self.hd).transpose(0, 1), cos, sin)
            k = apply_rope(k.reshape(B, self.kv, self.hd).transpose(0, 1), cos, sin)
            v = v.reshape(B, self.kv, self.hd).transpose(0, 1)
            for i, st in enumerate(sts):
                o = self._attend(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], st)
                rows.append(o.transpose(0, 1).reshape(1, self.h * self.hd))
        return self._mlp(_by_rows(self.o, torch.cat(rows), x), _by_rows)

    def forward_segments(self, x: torch.Tensor, cos, sin, segments: list[tuple[int, int, dict]]) -> torch.Tensor:
        """Several sequences' prompt chunks at once: rows `a:b` of x `[T, d]` continue the state of their segment
        `(a, b, st)`, each row at its own position (cos / sin `[T, D]`). The linear layers take all T rows in one
        call (a prompt's kernel dequantizes each weight tile once for every sequence), and so does attention with
        codexmini's kernels; every row is computed as `forward` on that sequence's chunk alone computes it. A segment
        of one row is a decoding step: prompts and decoding sequences can share one forward."""
        T, ext = x.shape[0], self.ext
        if self._step is not None and len(segments) <= decode_rows() and all(b - a == 1 for a, b, _ in segments):
            # one token each: a decoding step
            return self.forward_rows(x, cos, sin, [st for _, _, st in segments])
        a = ext.rms_norm(x, self.in_norm, self.eps) if ext else rms_norm(x, self.in_norm, self.eps)
        if ext is not None:  # every segment's rows in one call, each as `forward` gives it
            qkv = self._qkv(a)
            ext.rope_(qkv, cos, sin, self.h + self.kv, self.hd)
            starts = [i for i, _, _ in segments] + [segments[-1][1]]
            sts = [st for _, _, st in segments]
            o = self._softmax_segments(qkv, sts, starts) if self.type == "softmax" else \
                self._recurrent_rows(*qkv.split(self.split_qkv, dim=-1), sts, starts)
            return self._mlp(self.o(o, x))
        q, k, v = self.qkv(a).split(self.split_qkv, dim=-1) if self.qkv else (self.q(a), self.k(a), self.v(a))
        q = apply_rope(q.reshape(T, self.h, self.hd).transpose(0, 1), cos, sin)
        k = apply_rope(k.reshape(T, self.kv, self.hd).transpose(0, 1), cos, sin)
        v = v.reshape(T, self.kv, self.hd).transpose(0, 1)
        rows = [self._attend(q[:, i:j], k[:, i:j], v[:, i:j], st).transpose(0, 1).reshape(j - i, self.h * self.hd)
                for i, j, st in segments]
        return self._mlp(self.o(rows[0] if len(rows) == 1 else torch.cat(rows), x))

    def _qkv(self, a: torch.Tensor, run=None) -> torch.Tensor:
        """q, k and v side by side, `[rows, (H + 2 KV) hd]`, as codexmini's attention kernels take them: the fused
        kernel's output, or (q, k and v in different schemes, as a per-tensor allocation makes them) the three
        layers' outputs joined. `run`: how the kernels are called (`_by_rows` for a batched decode step)."""
        run = run or _direct
        if self.qkv is not None:
            return run(self.qkv, a)
        return torch.cat([run(self.q, a), run(self.k, a), run(self.v, a)], dim=-1)

    def _mlp(self, h: torch.Tensor, by_rows=None) -> torch.Tensor:
        """The MLP block after attention (`h` = the residual stream with attention added); `by_rows`: how the
        kernels are called (`_by_rows` for a batched decode step), directly if None."""
        ext, run = self.ext, by_rows or _direct
        m = ext.rms_norm(h, self.post_norm, self.eps) if ext else rms_norm(h, self.post_norm, self.eps)
        if isinstance(self.gate_up, CmxConcatLinear):
            act = run(self.gate_up.silu_mul, m, kernel=self.gate_up)
        elif self.gate_up and ext:
            act = ext.silu_mul(run(self.gate_up, m))
        elif self.gate_up:
            g, u = run(self.gate_up, m).chunk(2, dim=-1)
            act = F.silu(g) * u
        else:
            act = F.silu(run(self.gate, m)) * run(self.up, m)
        return run(self.down, act, h)

    def _attend(self, q, k, v, st):
        if self.type == "softmax":
            return self._softmax(q, k, v, st)
        if self.type == "linear":
            return self._linear(q, k, v, st)
        return self._hybrid(q, k, v, st)

    def reserve(self, st: dict, tokens: int) -> None:
        """Allocate the session's long-lived buffers before a prompt runs (a KV cache for `tokens`, the linear
        state), so that they are not placed among the prompt's temporaries."""
        if self.type == "softmax":
            self.grow_cache(st, tokens)
        elif self.ext is not None:
            self._kv_z(st)
        else:
            self._state(st)

    def grow_cache(self, st: dict, need: int) -> None:
        """Make the KV cache hold `need` tokens. It grows by at least a quarter (appending stays amortised O(1))
        to a multiple of 256 tokens, so it holds at most ~25% more than it has seen (doubling would waste up to
        half of the largest buffer of a decoder)."""
        n = st.get("n", 0)
        have = st["k"].shape[1] if "k" in st else 0
        if have >= need:
            return
        cap = -(-max(need, have + have // 4) // 256) * 256
        for name in ("k", "v"):
            buf = torch.empty(self.kv, cap, self.hd, dtype=self.kv_dtype)
            if n:
                buf[:, :n] = st[name][:, :n]
            st[name] = buf

    def _cache_slots(self, sts: list[dict], rows: list[int]) -> list[int]:
        """Each session's first free KV slot, its cache grown to take `rows[b]` more tokens."""
        ns = [st.get("n", 0) for st in sts]
        for st, n, r in zip(sts, ns, rows):
            self.grow_cache(st, n + r)
        return ns

    def _softmax_segments(self, qkv: torch.Tensor, sts: list[dict], starts: list[int]) -> torch.Tensor:
        """Rows of several sessions through codexmini's fused attention kernel, in one call: rows
        `starts[b]:starts[b + 1]` of qkv `[R, C]` (rotary applied) continue `sts[b]`, causally, each row computed as
        decoding it alone would be (a decoding step has one row per session, a prompt chunk a session's T rows).
        The reference is `_softmax`, torch's SDPA (which cost 3-5x as much on a short prompt)."""
        ns = self._cache_slots(sts, [starts[b + 1] - starts[b] for b in range(len(sts))])
        o = self.ext.attend_segments(qkv, [st["k"] for st in sts], [st["v"] for st in sts], ns, starts, self.h,
                                     self.kv, self.hd, self.hd ** -0.5, 0)
        for b, (st, n) in enumerate(zip(sts, ns)):
            st["n"] = n + starts[b + 1] - starts[b]
        return o

    def _softmax(self, q, k, v, st):
        T = q.shape[1]
        n = st.get("n", 0)
        self.grow_cache(st, n + T)
        st["k"][:, n:n + T], st["v"][:, n:n + T] = k, v
        st["n"] = S = n + T
        K, V = st["k"][:, :S].float(), st["v"][:, :S].float()
        mask = None
        if T > 1 and S > T:
            mask = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        return F.scaled_dot_product_attention(q[None], K[None], V[None], attn_mask=mask,
                                              is_causal=mask is None and T > 1, scale=self.hd ** -0.5,
                                              enable_gqa=self.groups > 1)[0]

    def _features(self, q, k, v):
        """Feature-mapped queries `[H, T, F]`, keys `[H, T, F]` and `[v, 1]` `[H, T, D+1]` (key heads repeated)."""
        return self._phi(q, "q"), self._rep(self._phi(k, "k")), append_ones(self._rep(v))

    def _state(self, st):
        """The linear-attention state `[H, F, D+1]` (zeros before the first token): the ops functions' form, the
        normaliser as column D (a session `_kv_z` held is joined back)."""
        if "state" not in st:
            st["state"] = torch.cat([st.pop("kv"), st.pop("z")[..., None]], -1) if "kv" in st else \
                torch.zeros(self.h, self.n_features, self.hd + 1)
        return st["state"]

    def _kv_z(self, st) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear or hybrid layer's state as codexmini's kernels hold it: `kv` `[H, F, D]` and its normaliser `z`
        `[H, F]` (`_state` split: rows of D floats stay aligned to cache lines, where D+1 columns made most loads and
        stores cross two; a prompt's linear attention 2x faster)."""
        if "kv" not in st:
            state = st.pop("state", None)
            if state is None:
                st["kv"], st["z"] = torch.zeros(self.h, self.n_features, self.hd), torch.zeros(self.h, self.n_features)
            else:
                st["kv"], st["z"] = state[..., :-1].contiguous(), state[..., -1].contiguous()
        return st["kv"], st["z"]

    def _recurrent_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sts: list[dict],
                        starts: list[int]) -> torch.Tensor:
        """Tokens of several sessions through codexmini's fused linear / hybrid kernel, token by token: rows
        `starts[b]:starts[b + 1]` of q `[R, H * hd]` (rotated) and k / v `[R, KV * hd]` continue `sts[b]`, in order
        (a decoding step has one row per session, a prompt chunk a session's T rows). Every row is computed exactly
        as decoding it alone would be; `[R, H * hd]`. The reference is `_linear` / `_hybrid` without the kernels
        (ops' chunked forms)."""
        fq, fk = self._features_rows(q, k)
        if self.type == "linear":
            kvz = [self._kv_z(st) for st in sts]
            o = self.ext.linear_segments_([kv for kv, _ in kvz], [z for _, z in kvz], starts, fq, fk, v.contiguous(),
                                          self.decay_mult, NORMALISER_EPS)
        else:
            sts = [self._ring(st) for st in sts]
            kvz = [self._kv_z(st) for st in sts]
            o = self.ext.hybrid_segments_([kv for kv, _ in kvz], [z for _, z in kvz], [st["wk"] for st in sts],
                                          [st["wfk"] for st in sts], [st["wv1"] for st in sts],
                                          [st["wmeta"] for st in sts], starts, q.contiguous(), k.contiguous(),
                                          v.contiguous(), fq, fk, self.decay_mult, self.hd ** -0.5, NORMALISER_EPS)
        return o.reshape(q.shape[0], self.h * self.hd)

    def _recurrent(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: dict) -> torch.Tensor:
        """`_recurrent_rows` for one session's T tokens in the attention layout (q `[H, T, hd]`, k / v
        `[KV, T, hd]`); `[H, T, hd]`."""
        T = q.shape[1]
        rows = [x.transpose(0, 1).reshape(T, -1) for x in (q, k, v)]
        return self._recurrent_rows(*rows, [st], [0, T]).reshape(T, self.h, self.hd).transpose(0, 1)

    def _features_rows(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps of B tokens' query heads `[B, H, F]` and key heads `[B, KV, F]` (from q `[B, H * hd]`, k
        `[B, KV * hd]`)."""
        B, H, KV, D = q.shape[0], self.h, self.kv, self.hd
        if self.fm_w is not None:
            return (self.ext.hedgehog(q.reshape(B * H, D).contiguous(), self.fm_w["q"]).reshape(B, H, -1),
                    self.ext.hedgehog(k.reshape(B * KV, D).contiguous(), self.fm_w["k"]).reshape(B, KV, -1))
        # [heads, rows, F] as `_phi` maps them, then row-major
        return (self._phi(q.reshape(B, H, D).transpose(0, 1), "q").transpose(0, 1).contiguous(),
                self._phi(k.reshape(B, KV, D).transpose(0, 1), "k").transpose(0, 1).contiguous())

    def _linear(self, q, k, v, st):
        if self.ext is not None:
            return self._recurrent(q, k, v, st)
        fq, fk, v1 = self._features(q, k, v)
        # ops work on a batch: this one sequence is a batch of one
        o, state = linear_attn(fq[None], fk[None], v1[None], 1.0, self._state(st)[None], True, self.log_decay,
                               self.chunk)
        _store(st, "state", state[0])
        return normalise(o[0])

    def _ring(self, st: dict) -> dict:
        """The session's window as the decode ring buffer (`wmeta` = count, oldest slot), made from the time-ordered
        window the first time a token is decoded; `window_to_time_order` turns it back."""
        if "wmeta" not in st:
            H, w, D = self.h, self.window, self.hd
            n = st["wk"].shape[1] if "wk" in st else 0
            for name, width in (("wk", D), ("wfk", self.n_features), ("wv1", D + 1)):
                ring = torch.zeros(H, w, width)
                if n:
                    ring[:, :n] = st[name]
                st[name] = ring
            st["wmeta"] = torch.tensor([n, 0], dtype=torch.long)
        return st

    def window_to_time_order(self, st: dict) -> None:
        """A hybrid layer's window back from the decode ring buffer to time order (what `_hybrid` and saved
        sessions hold); nothing to do otherwise."""
        meta = st.pop("wmeta", None)
        if meta is None:
            return
        count, oldest = int(meta[0]), int(meta[1])
        idx = (oldest + torch.arange(count)) % self.window
        for name in ("wk", "wfk", "wv1"):
            st[name] = st[name][:, idx].contiguous()

    # ----------------------------------------------------------------------- prefix reuse
    def snapshot(self, st: dict) -> dict | None:
        """A copy of a linear / hybrid layer's state as it is now (a hybrid window in time order), from which
        `fork` continues later. None for softmax layers: their KV cache is cut to length instead."""
        if self.type == "softmax":
            return None
        if self.ext is not None:
            out = {name: t.clone() for name, t in zip(("kv", "z"), self._kv_z(st))}
        else:
            out = {"state": self._state(st).clone()}
        if "wk" in st:
            meta = st.get("wmeta")
            if meta is None:
                out.update({n: st[n].clone() for n in ("wk", "wfk", "wv1")})
            else:  # the decode ring buffer, read out in time order (`st` itself is left as it is)
                idx = (int(meta[1]) + torch.arange(int(meta[0]))) % self.window
                out.update({n: st[n].index_select(1, idx) for n in ("wk", "wfk", "wv1")})
        return out

    def fork(self, st: dict, pos: int, snap: dict | None) -> dict:
        """The state of a new sequence that shares the first `pos` tokens of the sequence `st` belongs to: a
        softmax layer's KV cache copied up to `pos`; a linear / hybrid layer's state copied from `snap` (a snapshot
        taken at `pos`), or from `st` itself when `snap` is None (then `st` must be at `pos`)."""
        if self.type == "softmax":
            new: dict = {}
            self.grow_cache(new, pos + 256)
            new["k"][:, :pos], new["v"][:, :pos] = st["k"][:, :pos], st["v"][:, :pos]
            new["n"] = pos
            return new
        return {n: t.clone() for n, t in snap.items()} if snap is not None else self.snapshot(st)

    def _hybrid(self, q, k, v, st):
        if self.ext is not None:
            return self._recurrent(q, k, v, st)
        self.window_to_time_order(st)
        fq, fk, v1 = self._features(q, k, v)
        k, w = self._rep(k), self.window
        if "wk" in st:
            k_all, fk_all, v1_all = (torch.cat([st[n], x], dim=1) for n, x in
                                     (("wk", k), ("wfk", fk), ("wv1", v1)))
        else:
            k_all, fk_all, v1_all = k, fk, v1
        o, state = hybrid_attn(q[None], k_all[None], fq[None], fk_all[None], v1_all[None], w, self.hd ** -0.5,
                               self._state(st)[None], self.log_decay, None, self.chunk)
        for name, value in (("state", state[0]), ("wk", k_all[:, -w:]), ("wfk", fk_all[:, -w:]),
                            ("wv1", v1_all[:, -w:])):
            _store(st, name, value)
        return o[0]


def _release_repacked(f: CmxFile, kernels: list) -> None:
    """Int layers repacked into panels compute from their own copy: the file's pages under them, read once for the
    repack, would otherwise stay resident beside it (the weights' size again). `CmxFile.release` drops them."""
    for k in kernels:
        for part in getattr(k, "parts", [k]):
            if isinstance(part, CmxGroupLinear) and part.panels:
                for t in part.sources:
                    f.release(t)


class Runtime:
    """A loaded .cmx model. `forward` runs tokens through it; `generate` / `stream` sample text."""

    def __init__(self, path: str | Path, kernels: str = "auto", act_dtype: str = "auto",
                 threads: int | None = None, prefill_chunk: int = 512, kv_dtype: str = "auto"):
        """`kernels`: "auto" (the default: "cmx" where codexmini's own CPU kernels build, else "native"), "cmx"
        (those kernels, on the file's packed weights), "native" (torch's packed int8 / int4 CPU kernels) or
        "dequant" (int weights widened to fp32 at load); see `kernels.py`.

        `act_dtype`: what the int kernels are fed. "auto" (the default) is each mode's fast choice: for "cmx",
        activations quantized to int8 per 32 columns with integer dot products while decoding (llama.cpp's
        approach; up to `decode_rows()` rows, prompt chunks included), and longer prompts' int matmuls in bf16
        where the CPU multiplies bf16 natively and faster than fp32 (measured at load, `native.bf16_prompts_pay`:
        about 1.5x the prefill speed on an AMD EPYC; fp32 elsewhere); for "native", bf16 (torch's
        CPU int kernels are fast only with bf16 inputs). "float32" gives results equal to the dequantized
        reference. Everything else (norms, attention, float layers) runs in fp32.

        `kv_dtype`: the softmax layers' KV caches, "auto" (float16 where codexmini's kernels attend in AVX-512, else
        float32), "float16" or "float32" (see `resolve_kv_dtype`)."""
        if threads:
            torch.set_num_threads(threads)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        t0 = time.perf_counter()
        kernels = self.kernels = resolve_mode(kernels)
        if kernels == "cmx":
            from . import native

            self.kv_dtype = resolve_kv_dtype(kv_dtype, native.load().vector_attention())
        else:
            self.kv_dtype = resolve_kv_dtype(kv_dtype, False)
        f = read_cmx(path, mmap=True)  # weights are the file's pages, read as they are first used
        self.file, self.config, self.checksum = Path(path), f.config, f.checksum
        c = f.config
        dt = self.act_dtype = resolve_act(kernels, act_dtype)
        self.tokenizer = load_tokenizer(f.tokenizer_json, path)
        self.chat_template = f.chat_template
        t = f.tensors
        self.embed_scheme = f.schemes.get(EMBED)
        tied = c.get("tie_word_embeddings")
        if c.get("embedding_rank"):
            self.embed = (t["model.embed_tokens.embed.weight"].float() @ t["model.embed_tokens.proj.weight"].float()
                          .t()).contiguous()
        elif self.embed_scheme is not None:
            # quantized rows, dequantized as looked up; their scales (and zero points) are small and stay mapped
            self.embed = self._rows(f, EMBED + ".qweight")
            self.embed_scale, self.embed_zero = t[EMBED + ".scale"], t.get(EMBED + ".zero")
            self.embed_min = t.get(EMBED + ".min")
        else:
            # kept as stored: decoding only looks rows up (a tied head reads the whole matrix: it stays mapped)
            self.embed = t[EMBED + ".weight"] if tied else self._rows(f, EMBED + ".weight")
        self.norm = t["model.norm.weight"].float()
        # A tied head is the table: the quantized table through its int kernel, or the float one widened to fp32;
        # an untied head has its own kernel.
        if not tied:
            self.head = make_linear(t, "lm_head", f.schemes.get("lm_head"), kernels, dt)
        elif self.embed_scheme is not None:
            self.head = make_linear(t, EMBED, self.embed_scheme, kernels, dt)
        else:
            self.head = make_linear({"lm_head.weight": self.embed}, "lm_head", None)
        _release_repacked(f, [self.head])
        self.layers = []
        for i in range(c["num_hidden_layers"]):
            self.layers.append(Layer(f, i, kernels, dt, self.kv_dtype))
            _release_repacked(f, self.layers[-1].linears)  # as it goes: the peak holds one layer twice, not all
        # and once more for all of them at the end: in some loads (2 of 8 runs of tests/runtime, none alone) pages
        # released early were mapped again by the time the load ended (40 pages of the test's 1 MB model: reads of
        # the tensors after them can map neighbouring file pages too, e.g. the kernel's fault-around)
        _release_repacked(f, [self.head] + [k for layer in self.layers for k in layer.linears])
        self.head_dim, self.rope_theta, self.eps = c["head_dim"], c["rope_theta"], c["rms_norm_eps"]
        eos = c.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.load_seconds = time.perf_counter() - t0

    @property
    def exact_rows(self) -> int:
        """The most rows a forward may hold with every row computed exactly as it is alone: the least of its linear
        kernels' (`exact_rows`; attention and the linear states are per sequence and always exact). The server mixes
        decoding rows into a prefill forward only within it, so that greedy answers do not depend on what runs
        beside them."""
        return min(k.exact_rows for k in [self.head] + [k for layer in self.layers for k in layer.linears])

    @property
    def recurrent(self) -> bool:
        """Whether any layer keeps a linear state (which `fork` needs a `Checkpoint` for, except at the end)."""
        return any(layer.type != "softmax" for layer in self.layers)

    @staticmethod
    def _rows(f: CmxFile, name: str):
        """An embedding table for lookups: its rows read from the file where it is mapped (see `FileRows`)."""
        t = f.tensors[name]
        if f.ranges is None or not hasattr(os, "preadv") or t.dim() != 2:
            return t
        return FileRows(f.path, f.ranges[name][0], t.shape, t.dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[n, hidden]` in fp32: rows of the table, dequantized when it is quantized."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if self.embed_scheme is None:
            return self.embed[ids].float()
        zero = self.embed_zero[ids] if self.embed_zero is not None else None
        low = self.embed_min[ids] if self.embed_min is not None else None
        return dequantize(self.embed_scheme, self.embed[ids], self.embed_scale[ids], zero, low)

    # ----------------------------------------------------------------------- forward
    def new_session(self) -> Session:
        return Session(layers=[{} for _ in self.layers])

    def weight_bytes(self) -> int:
        """Bytes of weights read per decoded token: every linear layer and the head (not the embedding table)."""
        return self.head.nbytes + sum(k.nbytes for layer in self.layers for k in layer.linears)

    @torch.inference_mode()
    def forward(self, ids: list[int] | torch.Tensor, session: Session, all_logits: bool = False) -> torch.Tensor:
        """Run `ids` after what `session` holds; returns logits `[T, V]` (or of the last token, `[V]`).

        A long prompt runs `prefill_chunk` tokens at a time (each chunk continues the caches / states the previous
        one left), so prefill activations stay bounded whatever the prompt length."""
        ids = check_token_ids(ids, self.config["vocab_size"])
        if ids.numel() > 1:  # a prompt must fit the model's positions (decoding past them is the caller's call)
            check_prompt_length(ids.numel(), max_positions(self.config), session.pos)
        if ids.numel() > 1:  # a prompt: size the KV caches once for all of it and 256 decoded tokens
            for layer, st in zip(self.layers, session.layers):
                layer.reserve(st, session.pos + ids.numel() + 256)
        chunks = ids.split(self.prefill_chunk)
        if all_logits:
            return torch.cat([self._forward(chunk, session, True) for chunk in chunks])
        for chunk in chunks:
            logits = self._forward(chunk, session, False)
        return logits

    @torch.inference_mode()
    def prefill_batch(self, chunks: list[list[int]], sessions: list[Session]) -> torch.Tensor:
        """Prompt chunks of several sessions (`chunks[i]` continues `sessions[i]`) in one forward; returns the
        logits after each chunk `[B, V]`, row i equal to `forward(chunks[i], sessions[i])` up to the order of
        additions in the matmuls. A prompt's int kernel dequantizes every weight tile once per call whatever the
        rows, which for short prompts costs more than the multiplications: one call for several prompts pays it
        once (`Layer.forward_segments`)."""
        if not chunks or len(chunks) != len(sessions) or not all(len(c) for c in chunks):
            raise ValueError(f"prefill_batch: {len(chunks)} non-empty chunks for {len(sessions)} sessions")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("prefill_batch: a session appears twice (each chunk continues its own sequence)")
        ids = torch.as_tensor([t for c in chunks for t in c], dtype=torch.long)
        cos, sin = rotary_cos_sin(torch.cat([torch.arange(s.pos, s.pos + len(c)) for c, s in zip(chunks, sessions)]),
                                  self.head_dim, self.rope_theta)
        ends = torch.tensor([len(c) for c in chunks]).cumsum(0)
        bounds = list(zip([0] + ends[:-1].tolist(), ends.tolist()))
        for c, s in zip(chunks, sessions):
            if len(c) > 1:  # as `forward` does for a prompt: the caches sized once for it and 256 decoded tokens
                for layer, st in zip(self.layers, s.layers):
                    layer.reserve(st, s.pos + len(c) + 256)
        x = self.lookup(ids)
        for i, layer in enumerate(self.layers):
            x = layer.forward_segments(x, cos, sin, [(a, b, s.layers[i]) for (a, b), s in zip(bounds, sessions)])
        for c, s in zip(chunks, sessions):
            s.pos += len(c)
            s.tokens.extend(int(t) for t in c)
        return self.head(self._final_norm(x[ends - 1]))

    @torch.inference_mode()
    def decode_batch(self, ids: list[int], sessions: list[Session]) -> torch.Tensor:
        """One token for each of several sessions (`ids[i]` continues `sessions[i]`) in one forward; returns logits
        `[B, V]`, row i equal to `forward([ids[i]], sessions[i])` (up to the order of fp32 additions in the
        matmuls: the int kernels compute up to `decode_rows()` rows each exactly as one, more rows take their prompt path).

        The linear layers and the head read their weights once for all B rows, which is what makes decoding
        several sequences together cheaper than one after another; attention runs per session on its own KV
        cache or state, at its own position (`Layer.forward_rows`)."""
        if not ids or len(ids) != len(sessions):
            raise ValueError(f"decode_batch: {len(ids)} token ids for {len(sessions)} sessions")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("decode_batch: a session appears twice (each row continues its own sequence)")
        t = check_token_ids(ids, self.config["vocab_size"])
        cos, sin = rotary_cos_sin(torch.tensor([s.pos for s in sessions]), self.head_dim, self.rope_theta)
        x = self.lookup(t)
        for i, layer in enumerate(self.layers):
            x = layer.forward_rows(x, cos, sin, [s.layers[i] for s in sessions])
        for s, tok in zip(sessions, t.tolist()):
            s.pos += 1
            s.tokens.append(tok)
        return _by_rows(self.head, self._final_norm(x))

    @torch.inference_mode()
    def checkpoint(self, session: Session) -> Checkpoint:
        """A copy of the linear / hybrid layers' states of `session` as they are now (see `Checkpoint`)."""
        return Checkpoint(session.pos, [layer.snapshot(st) for layer, st in zip(self.layers, session.layers)])

    @torch.inference_mode()
    def fork(self, session: Session, pos: int, checkpoint: Checkpoint | None = None) -> Session:
        """A new session holding the first `pos` tokens of `session`, which is left untouched: softmax layers get
        a copy of its KV cache cut to `pos`; linear / hybrid layers the states of `checkpoint` (taken from this
        session or any other at the same `pos` tokens), or `session`'s own when `pos` is where it is. Continuing
        the new session equals running those tokens from scratch (the prefix cache's resume)."""
        if not 0 <= pos <= session.pos:
            raise ValueError(f"fork: position {pos} is outside the session's {session.pos} tokens")
        if pos == 0:
            return self.new_session()
        snaps = [None] * len(self.layers)
        if checkpoint is not None and (checkpoint.pos == pos or pos != session.pos):
            if checkpoint.pos != pos:
                raise ValueError(f"fork: the checkpoint is at {checkpoint.pos} tokens, not {pos}")
            snaps = checkpoint.layers
        elif pos != session.pos and self.recurrent:
            raise ValueError(f"fork: a linear state cannot be cut back from {session.pos} to {pos} tokens; give "
                             "a checkpoint taken at that position")
        return Session(pos=pos, tokens=session.tokens[:pos],
                       layers=[layer.fork(st, pos, snap) for layer, st, snap in zip(self.layers, session.layers,
                                                                                  snaps)])

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm before the head: codexmini's kernel where the layers use it (as theirs do; ops' torch form cost
        ~2% of a decoding step in small tensor ops), else ops' `rms_norm`."""
        ext = self.layers[0].ext
        if ext is None:
            return rms_norm(x, self.norm, self.eps)
        return ext.rms_norm(x.contiguous(), self.norm, self.eps)

    def _forward(self, ids: torch.Tensor, session: Session, all_logits: bool) -> torch.Tensor:
        T = ids.numel()
        cos, sin = rotary_cos_sin(torch.arange(session.pos, session.pos + T), self.head_dim, self.rope_theta)
        x = self.lookup(ids)
        for layer, st in zip(self.layers, session.layers):
            x = layer.forward(x, cos, sin, st)
        session.pos += T
        session.tokens.extend(ids.tolist())
        x = x if all_logits else x[-1:]
        x = self._final_norm(x)
        logits = self.head(x)
        return logits if all_logits else logits[0]

    # ----------------------------------------------------------------------- text
    def stream(self, prompt: str, cfg=None, session: Session | None = None):
        """Yield text pieces of the continuation of `prompt` (see `SamplingConfig`)."""
        from .sampling import SamplingConfig, stream_text

        return stream_text(self, prompt, cfg or SamplingConfig(), session)

    def generate(self, prompt: str, cfg=None, session: Session | None = None) -> str:
        return "".join(self.stream(prompt, cfg, session))

    def generate_batch(self, prompts: list[str], cfg=None) -> list[str]:
        """One continuation per prompt (each in its own session; a seed, if set, applies to each)."""
        return [self.generate(p, cfg) for p in prompts]

    # ----------------------------------------------------------------------- sessions
    def save_session(self, session: Session, path: str | Path) -> None:
        """Save a session (e.g. after prefilling a long system prompt) to a safetensors file, atomically."""
        import json

        from ..cmx import save_safetensors_atomic

        tensors = {}
        for layer, st in zip(self.layers, session.layers):  # files hold the ops functions' forms
            if layer.type == "hybrid":
                layer.window_to_time_order(st)
            if layer.type != "softmax" and st:
                layer._state(st)
        for i, st in enumerate(session.layers):
            for k, v in st.items():
                if torch.is_tensor(v):
                    n = st.get("n")
                    tensors[f"{i}.{k}"] = (v[:, :n] if k in ("k", "v") else v).contiguous()
        meta = {"model_checksum": self.checksum, "pos": str(session.pos), "tokens": json.dumps(session.tokens)}
        save_safetensors_atomic(tensors, path, meta)

    def load_session(self, path: str | Path) -> Session:
        import json

        from safetensors import safe_open

        from ..cmx import CmxError

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001
            raise CmxError(f"{path}: not a readable session file: {err}") from err
        if meta.get("model_checksum") != self.checksum:
            raise CmxError(f"{path}: this session was saved with a different model; prefill it again")
        session = self.new_session()
        session.pos, session.tokens = int(meta["pos"]), json.loads(meta["tokens"])
        for name, t in tensors.items():
            i, key = name.split(".", 1)
            # caches in this runtime's dtype, whatever the one that saved them used
            session.layers[int(i)][key] = t.to(self.kv_dtype, copy=True) if key in ("k", "v") else t.clone()
        for st in session.layers:
            if "k" in st:
                st["n"] = st["k"].shape[1]
        return session
