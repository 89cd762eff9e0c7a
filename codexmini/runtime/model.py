"""The on-device runtime: loads a .cmx file and runs prefill and token-by-token decode, one sequence at a time.

It is a second implementation of the CodexMini forward pass on purpose: it depends only on torch, safetensors,
tokenizers and the .cmx format module (so the artifact stands on its own), and it is tested against the PyTorch
model (logits, greedy generation) for every layer type.

Per layer type, the decoding state:
- softmax: a KV cache sized per prompt and grown in place (by quarters), so each token appends instead of copying;
- linear: a fixed-size state `[H, F, D+1]` (the last column accumulates the normaliser);
- hybrid: a window of the last `sliding_window` keys/values plus the linear state of every older key.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..export.cmx import CmxFile, read_cmx
from .kernels import CmxConcatLinear, make_fused_linear, make_linear, resolve_act, resolve_mode

NORMALISER_EPS = 1e-6  # as in the PyTorch model


# --------------------------------------------------------------------------- feature maps
def _feature_map(name: str, weight: torch.Tensor | None, head_dim: int):
    if name == "elu":
        return lambda x: F.elu(x) + 1.0
    if name == "relu":
        return F.relu
    if name == "hedgehog":
        w = weight.float()

        def hedgehog(x):  # x [H, T, D], w [H, D, F]
            proj = torch.bmm(x, w)
            return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)
        return hedgehog
    rows, cols = torch.triu_indices(head_dim, head_dim)
    pair_w = torch.where(rows == cols, 1.0, 2.0 ** 0.5) / (2.0 ** 0.5 * head_dim ** 0.5)

    def taylor(x):
        return torch.cat([torch.ones_like(x[..., :1]), x / head_dim ** 0.25, x[..., rows] * x[..., cols] * pair_w],
                         dim=-1)
    return taylor


def _chunk_linear(fq, fk, v1, state, log_decay, chunk: int = 64):
    """Causal linear attention over T tokens from `state` (chunked form). fq/fk `[H,T,F]`, v1 `[H,T,V]`,
    state `[H,F,V]`, log_decay `[H]` or None. Returns (out `[H,T,V]`, new state)."""
    H, T, _ = fq.shape
    outs = []
    for s in range(0, T, chunk):
        q, k, v = fq[:, s:s + chunk], fk[:, s:s + chunk], v1[:, s:s + chunk]
        C = q.shape[1]
        scores = q @ k.transpose(1, 2)  # [H, C, C]
        if log_decay is None:
            scores = scores.tril()
            outs.append(q @ state + scores @ v)
            state = state + k.transpose(1, 2) @ v
        else:
            t = torch.arange(C, dtype=torch.float32)
            diff = (t[:, None] - t[None, :])
            decay = torch.exp(log_decay[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
            q_decay = torch.exp(log_decay[:, None] * (t[None] + 1))[..., None]  # [H, C, 1]
            k_decay = torch.exp(log_decay[:, None] * (C - 1 - t[None]))[..., None]
            outs.append((q * q_decay) @ state + (scores * decay) @ v)
            state = torch.exp(log_decay * C)[:, None, None] * state + (k * k_decay).transpose(1, 2) @ v
    return torch.cat(outs, dim=1), state


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


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


class Layer:
    def __init__(self, f: CmxFile, i: int, mode: str, act_dtype):
        c, t = f.config, f.tensors
        p = f"model.layers.{i}."
        self.type = c["layer_types"][i]
        self.h, self.kv = c["layer_num_attention_heads"][i], c["layer_num_key_value_heads"][i]
        self.hd, self.eps, self.window = c["head_dim"], c["rms_norm_eps"], c.get("sliding_window", 64)
        self.groups = self.h // self.kv
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
        # codexmini's kernels also fuse the small steps (norms, rotary, silu * up, one-token attention); the
        # tensor-op path below stays as their reference (and serves the other kernel modes).
        from . import native

        self.ext = native.load() if mode == "cmx" else None
        self.split_qkv = (self.h * self.hd, self.kv * self.hd, self.kv * self.hd)
        if self.type != "softmax":
            fm = c["feature_map"]
            # hedgehog's weights in fp32, once: for the tensor-op maps and the fused kernel alike
            self.fm_w = {s: t[p + f"self_attn.feature_map_{s}.weight"].float().contiguous() for s in "qk"} \
                if fm == "hedgehog" else None
            self.fq = _feature_map(fm, self.fm_w and self.fm_w["q"], self.hd)
            self.fk = _feature_map(fm, self.fm_w and self.fm_w["k"], self.hd)
            d = t.get(p + "self_attn.decay_logit")
            self.log_decay = F.logsigmoid(d.float()) if d is not None else None
            self.decay_mult = torch.exp(self.log_decay) if d is not None else torch.empty(0)
            self.n_features = self.fk(torch.zeros(self.kv, 1, self.hd)).shape[-1]

    def _rep(self, x):  # [KV, T, D] -> [H, T, D]
        return x if self.groups == 1 else x.repeat_interleave(self.groups, dim=0)

    def forward(self, x: torch.Tensor, cos, sin, st: dict) -> torch.Tensor:
        T, ext = x.shape[0], self.ext
        a = ext.rms_norm(x, self.in_norm, self.eps) if ext else _rms(x, self.in_norm, self.eps)
        if ext and self.qkv:
            qkv = self.qkv(a)
            ext.rope_(qkv, cos, sin, self.h + self.kv, self.hd)  # query and key heads, in place
            if self.type == "softmax" and T == 1:
                o = self._softmax_decode(qkv, st)
            else:
                q, k, v = (t.reshape(T, -1, self.hd).transpose(0, 1) for t in qkv.split(self.split_qkv, dim=-1))
                o = self._attend(q, k, v, st).transpose(0, 1).reshape(T, self.h * self.hd)
        else:
            q, k, v = self.qkv(a).split(self.split_qkv, dim=-1) if self.qkv else (self.q(a), self.k(a), self.v(a))
            q = _rope(q.reshape(T, self.h, self.hd).transpose(0, 1), cos, sin)
            k = _rope(k.reshape(T, self.kv, self.hd).transpose(0, 1), cos, sin)
            v = v.reshape(T, self.kv, self.hd).transpose(0, 1)
            o = self._attend(q, k, v, st).transpose(0, 1).reshape(T, self.h * self.hd)
        h = self.o(o, x)
        m = ext.rms_norm(h, self.post_norm, self.eps) if ext else _rms(h, self.post_norm, self.eps)
        if isinstance(self.gate_up, CmxConcatLinear):
            act = self.gate_up.silu_mul(m)
        elif self.gate_up and ext:
            act = ext.silu_mul(self.gate_up(m))
        elif self.gate_up:
            g, u = self.gate_up(m).chunk(2, dim=-1)
            act = F.silu(g) * u
        else:
            act = F.silu(self.gate(m)) * self.up(m)
        return self.down(act, h)

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
            buf = torch.empty(self.kv, cap, self.hd)
            if n:
                buf[:, :n] = st[name][:, :n]
            st[name] = buf

    def _softmax_decode(self, qkv: torch.Tensor, st: dict) -> torch.Tensor:
        """One token through codexmini's fused attention kernel (the reference is `_softmax`)."""
        n = st.get("n", 0)
        self.grow_cache(st, n + 1)
        o = self.ext.attend_decode(qkv, st["k"], st["v"], n, self.h, self.kv, self.hd, self.hd ** -0.5, 0)
        st["n"] = n + 1
        return o

    def _softmax(self, q, k, v, st):
        T = q.shape[1]
        n = st.get("n", 0)
        self.grow_cache(st, n + T)
        st["k"][:, n:n + T], st["v"][:, n:n + T] = k, v
        st["n"] = S = n + T
        K, V = st["k"][:, :S], st["v"][:, :S]
        mask = None
        if T > 1 and S > T:
            mask = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        return F.scaled_dot_product_attention(q[None], K[None], V[None], attn_mask=mask,
                                              is_causal=mask is None and T > 1, scale=self.hd ** -0.5,
                                              enable_gqa=self.groups > 1)[0]

    def _features(self, q, k, v):
        fq, fk = self.fq(q), self._rep(self.fk(k))
        v = self._rep(v)
        return fq, fk, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)

    def _state(self, st):
        """The linear-attention state `[H, F, D+1]` (zeros before the first token)."""
        if "state" not in st:
            st["state"] = torch.zeros(self.h, self.n_features, self.hd + 1)
        return st["state"]

    def _linear_decode(self, q, k, v, st):
        """One token through codexmini's fused linear-attention step (the reference is `_linear`)."""
        ext = self.ext
        fq, fk = self._features_one(q, k)
        o = ext.linear_decode_(self._state(st), fq, fk, v.reshape(self.kv, self.hd).contiguous(),
                               self.decay_mult, NORMALISER_EPS)
        return o[:, None]

    def _linear(self, q, k, v, st):
        if self.ext is not None and q.shape[1] == 1:
            return self._linear_decode(q, k, v, st)
        fq, fk, v1 = self._features(q, k, v)
        state = self._state(st)
        if q.shape[1] == 1:
            kv = fk.transpose(1, 2) @ v1  # [H, F, V]
            state = state * torch.exp(self.log_decay)[:, None, None] + kv if self.log_decay is not None else \
                state + kv
            o = fq @ state
        else:
            o, state = _chunk_linear(fq, fk, v1, state, self.log_decay)
        _store(st, "state", state)
        return o[..., :-1] / (o[..., -1:] + NORMALISER_EPS)

    def _features_one(self, q, k):
        """Feature maps of one token's query heads `[H, F]` and key heads `[KV, F]` (not repeated)."""
        if self.fm_w is not None:
            return (self.ext.hedgehog(q.reshape(self.h, self.hd), self.fm_w["q"]),
                    self.ext.hedgehog(k.reshape(self.kv, self.hd), self.fm_w["k"]))
        return self.fq(q).reshape(self.h, -1).contiguous(), self.fk(k).reshape(self.kv, -1).contiguous()

    def _hybrid_decode(self, q, k, v, st):
        """One token through codexmini's fused hybrid step: the window lives in a ring buffer (`wmeta` = count,
        oldest slot) while decoding; `window_to_time_order` turns it back into the reference's layout."""
        fq, fk = self._features_one(q, k)
        H, w, D = self.h, self.window, self.hd
        if "wmeta" not in st:
            n = st["wk"].shape[1] if "wk" in st else 0
            for name, width in (("wk", D), ("wfk", self.n_features), ("wv1", D + 1)):
                ring = torch.zeros(H, w, width)
                if n:
                    ring[:, :n] = st[name]
                st[name] = ring
            st["wmeta"] = torch.tensor([n, 0], dtype=torch.long)
        o = self.ext.hybrid_decode_(self._state(st), st["wk"], st["wfk"], st["wv1"], st["wmeta"],
                                    q.reshape(H, D).contiguous(), k.reshape(self.kv, D).contiguous(),
                                    v.reshape(self.kv, D).contiguous(), fq, fk, self.decay_mult, D ** -0.5,
                                    NORMALISER_EPS)
        return o[:, None]

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

    def _hybrid(self, q, k, v, st):
        if self.ext is not None and q.shape[1] == 1:
            return self._hybrid_decode(q, k, v, st)
        self.window_to_time_order(st)
        fq, fk, v1 = self._features(q, k, v)
        k = self._rep(k)
        H, T, D = q.shape
        w = self.window
        state = self._state(st)
        if "wk" in st:
            k_all, fk_all, v1_all = (torch.cat([st[n], x], dim=1) for n, x in
                                     (("wk", k), ("wfk", fk), ("wv1", v1)))
        else:
            k_all, fk_all, v1_all = k, fk, v1
        wc = k_all.shape[1] - T
        # Linear part: query i sees the keys at combined index <= wc + i - w (those that left its window).
        fk_al = F.pad(fk_all, (0, 0, w, 0))[:, wc:wc + T]
        v1_al = F.pad(v1_all, (0, 0, w, 0))[:, wc:wc + T]
        if T == 1:
            decay = torch.exp(self.log_decay)[:, None, None] if self.log_decay is not None else 1.0
            state = state * decay + fk_al.transpose(1, 2) @ v1_al
            o_lin = fq @ state
            kw, vw = k_all[:, -w:], v1_all[:, -w:, :-1]
            scores = (q @ kw.transpose(1, 2)) * self.hd ** -0.5
            m = scores.amax(-1, keepdim=True)
            a = torch.exp(scores - m)
            num, den = a @ vw, a.sum(-1, keepdim=True)
        else:
            o_lin, state = _chunk_linear(fq, fk_al, v1_al, state, self.log_decay)
            num, den = self._window_prefill(q, k_all, v1_all[..., :-1], wc, w)
        for name, value in (("state", state), ("wk", k_all[:, -w:]), ("wfk", fk_all[:, -w:]),
                            ("wv1", v1_all[:, -w:])):
            _store(st, name, value)
        return (num + o_lin[..., :-1]) / (den + o_lin[..., -1:] + NORMALISER_EPS)

    def _window_prefill(self, q, k_all, v_all, wc, w, block: int = 64):
        """Sliding-window softmax numerator / denominator for T queries, a block of queries at a time."""
        H, T, D = q.shape
        nums, dens = [], []
        for s in range(0, T, block):
            e = min(s + block, T)
            lo = max(wc + s - w + 1, 0)
            kb, vb = k_all[:, lo:wc + e], v_all[:, lo:wc + e]
            scores = (q[:, s:e] @ kb.transpose(1, 2)) * self.hd ** -0.5  # [H, e-s, keys]
            qi = torch.arange(s, e)[:, None] + wc
            kj = torch.arange(lo, wc + e)[None, :]
            scores = scores.masked_fill(~((kj <= qi) & (kj > qi - w)), float("-inf"))
            m = scores.amax(-1, keepdim=True)
            a = torch.exp(scores - m)
            nums.append(a @ vb)
            dens.append(a.sum(-1, keepdim=True))
        return torch.cat(nums, dim=1), torch.cat(dens, dim=1)


class Runtime:
    """A loaded .cmx model. `forward` runs tokens through it; `generate` / `stream` sample text."""

    def __init__(self, path: str | Path, kernels: str = "auto", act_dtype: str = "auto",
                 threads: int | None = None, prefill_chunk: int = 512):
        """`kernels`: "auto" (the default: "cmx" where codexmini's own CPU kernels build, else "native"), "cmx"
        (those kernels, on the file's packed weights), "native" (torch's packed int8 / int4 CPU kernels) or
        "dequant" (int weights widened to fp32 at load); see `kernels.py`.

        `act_dtype`: what the int kernels are fed. "auto" (the default) is each mode's fast choice: for "cmx",
        activations quantized to int8 per 32 columns with integer dot products while decoding (llama.cpp's
        approach), and prompts' int matmuls (more than 4 rows) in bf16 where the CPU multiplies bf16 natively
        (AVX-512 BF16, AMX, Arm BF16: about 1.5x the prefill speed; fp32 elsewhere); for "native", bf16 (torch's
        CPU int kernels are fast only with bf16 inputs). "float32" gives results equal to the dequantized
        reference. Everything else (norms, attention, float layers) runs in fp32."""
        from tokenizers import Tokenizer

        if threads:
            torch.set_num_threads(threads)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        t0 = time.perf_counter()
        kernels = self.kernels = resolve_mode(kernels)
        f = read_cmx(path, mmap=True)  # weights are the file's pages, read as they are first used
        self.file, self.config, self.checksum = Path(path), f.config, f.checksum
        c = f.config
        dt = self.act_dtype = resolve_act(kernels, act_dtype)
        self.tokenizer = Tokenizer.from_str(f.tokenizer_json)
        self.chat_template = f.chat_template
        t = f.tensors
        self.embed_scale = None
        if c.get("embedding_rank"):
            self.embed = (t["model.embed_tokens.embed.weight"].float() @ t["model.embed_tokens.proj.weight"].float()
                          .t()).contiguous()
        elif f.schemes.get("model.embed_tokens") == "int8":
            self.embed = self._rows(f, "model.embed_tokens.qweight")  # int8 rows, dequantized as looked up
            self.embed_scale = t["model.embed_tokens.scale"].float()
        else:
            # kept as stored: decoding only looks rows up (a tied head reads the whole matrix: it stays mapped)
            self.embed = t["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else \
                self._rows(f, "model.embed_tokens.weight")
        self.norm = t["model.norm.weight"].float()
        # A tied head is the embedding matrix (widened to fp32 for the matmul); an untied one has its own kernel.
        self.head = make_linear(t, "lm_head", f.schemes.get("lm_head"), kernels, dt) \
            if not c.get("tie_word_embeddings") else make_linear({"lm_head.weight": self.embed}, "lm_head", None)
        self.layers = [Layer(f, i, kernels, dt) for i in range(c["num_hidden_layers"])]
        hd = c["head_dim"]
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        self.eps = c["rms_norm_eps"]
        eos = c.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.load_seconds = time.perf_counter() - t0

    @staticmethod
    def _rows(f: CmxFile, name: str):
        """An embedding table for lookups: its rows read from the file where it is mapped (see `FileRows`)."""
        t = f.tensors[name]
        if f.ranges is None or not hasattr(os, "preadv") or t.dim() != 2:
            return t
        return FileRows(f.path, f.ranges[name][0], t.shape, t.dtype)

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
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("Runtime.forward: no token ids to run")
        if ids.numel() > 1:  # a prompt: size the KV caches once for all of it and 256 decoded tokens
            for layer, st in zip(self.layers, session.layers):
                layer.reserve(st, session.pos + ids.numel() + 256)
        chunks = ids.split(self.prefill_chunk)
        if all_logits:
            return torch.cat([self._forward(chunk, session, True) for chunk in chunks])
        for chunk in chunks:
            logits = self._forward(chunk, session, False)
        return logits

    def _forward(self, ids: torch.Tensor, session: Session, all_logits: bool) -> torch.Tensor:
        T = ids.numel()
        pos = torch.arange(session.pos, session.pos + T, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed[ids].float()
        if self.embed_scale is not None:
            x = x * self.embed_scale[ids][:, None]
        for layer, st in zip(self.layers, session.layers):
            x = layer.forward(x, cos, sin, st)
        session.pos += T
        session.tokens.extend(ids.tolist())
        x = x if all_logits else x[-1:]
        x = _rms(x, self.norm, self.eps)
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

        from ..export.cmx import save_safetensors_atomic

        tensors = {}
        for layer, st in zip(self.layers, session.layers):
            if layer.type == "hybrid":
                layer.window_to_time_order(st)
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

        from ..export.cmx import CmxError

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
            session.layers[int(i)][key] = t.clone()
        for st in session.layers:
            if "k" in st:
                st["n"] = st["k"].shape[1]
        return session
