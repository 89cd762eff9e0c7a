"""Linear-layer kernels of the runtime: the portable .cmx layout is repacked once, at load, for the kernel used.

- float: `F.linear` on fp32 weights (fp16 files are widened at load).
- int8 ("native"): `torch._weight_int8pack_mm` on the int8 codes with per-channel scales.
- int4 ("native"; int3 / int2 are dequantized in this mode): `torch._weight_int4pack_mm_for_cpu` on torch's
  packed int4 layout, with per-group
  (scale, zero) pairs; our `(code - zero_u8) * scale` becomes torch's `(code - 8) * scale + (8 - zero_u8) * scale`.
- "cmx": codexmini's own kernels (`csrc/cmx_kernels.cpp`, built on first use by `native.load()`) for int8 and
  int4 / int3 / int2 groups: they read the portable layout as stored, fp16 scales included (the weights in memory
  are the file's), and take fp32 activations (equal to the dequantized reference up to the order of fp32
  additions) or int8 ones (the fast choice). Decode rows (up to `gemv_rows()`) run a SIMD GEMV that reads each
  weight row once for several of them; longer inputs dequantize a tile of rows at a time and multiply with MKL (in
  bf16 where that is measured faster). One exception to "as stored": int4 / int3 / int2 layers fed int8 activations
  on a CPU with AVX-512 VNNI are repacked once, at load, into panels of 16 rows (`to_panels`, `to_lowbit_panels`:
  the same bytes, reordered), whose kernels keep output channels in SIMD lanes (see `q4p_linear` in the source).
- "auto" (the runtime's default): "cmx" where the kernels build, else "native".
- "dequant": int weights expanded to fp32 at load (fastest matmul on CPUs without fast int kernels, but
  without the memory saving).

torch's int kernels take a fast path only with bf16 activations (on this 2-core AVX2 machine, 1x2048 @ 2048x2048:
fp32 F.linear 745 us; int8 304 us and int4 g32 412 us with bf16 inputs, but 3561 / 4995 us with fp32 inputs), so
the runtime feeds them bf16 by default. Every mode is tested against the dequantized reference
(`codexmini.ops.layouts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.layouts import Scheme, dequantize as dequantize_layout, implied_zero, unpack_int4

KERNEL_MODES = ("auto", "cmx", "native", "dequant")
# What the int kernels are fed: "auto" is each mode's fast choice (cmx: int8, native: bfloat16); "float32" is exact.
ACT_DTYPES = ("auto", "float32", "bfloat16", "int8")
FAST_ACT = {"cmx": "int8", "native": "bfloat16", "dequant": "float32"}
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# Every kernel object has `exact_rows`: the most rows one call computes each exactly as it computes that row alone
# (codexmini's GEMVs: up to their row limit). torch's matmuls promise nothing of the kind: a row's sums may depend on
# the rows beside it.
TORCH_EXACT_ROWS = 1


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous at a 64-byte aligned address (a fresh copy only when it is not). Tensors read from a
    safetensors file sit at arbitrary offsets, and torch's CPU int8 kernel segfaults on an unaligned weight
    (it issues aligned vector loads: seen on an AVX-512 CPU with torch 2.13)."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def dequantize(tensors: dict, name: str, scheme: str) -> torch.Tensor:
    """The fp32 weight of quantized layer `name` from its .cmx tensors: `ops.layouts`' dequantization (the reference
    for every kernel) on the file's tensors. The group size is read off the shapes (which `read_cmx` checked
    against the scheme); a symmetric scheme's zero is implied unless the file (version 2 and older) stores it."""
    return dequantize_layout(scheme, tensors[name + ".qweight"], tensors[name + ".scale"], tensors.get(name + ".zero"),
                             tensors.get(name + ".min"))


def zero_of(tensors: dict, name: str, scheme: str) -> torch.Tensor:
    """A group layer's zero points: stored (asymmetric, or an older file) or the implied middle code."""
    zero = tensors.get(name + ".zero")
    return zero if zero is not None else implied_zero(Scheme(scheme), tensors[name + ".scale"])


class FloatLinear:
    exact_rows = TORCH_EXACT_ROWS

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.float().contiguous()
        self.nbytes = self.weight.numel() * 4

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return y if residual is None else residual + y


class FloatConcatLinear:
    """Several float layers that read the same input, their outputs side by side (each keeps its own weight)."""

    exact_rows = TORCH_EXACT_ROWS

    def __init__(self, parts: list[FloatLinear]):
        self.parts = parts
        self.nbytes = sum(p.nbytes for p in parts)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([F.linear(x, p.weight) for p in self.parts], dim=-1)
        return y if residual is None else residual + y


class Int8Linear:
    exact_rows = TORCH_EXACT_ROWS

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, act_dtype: torch.dtype):
        self.codes, self.act_dtype = aligned(codes), act_dtype
        self.scale = aligned(scale.to(act_dtype))
        self.nbytes = self.codes.numel() + self.scale.numel() * self.scale.element_size()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.to(self.act_dtype), self.codes, self.scale).to(x.dtype)
        return y if residual is None else residual + y


class Int4Linear:
    exact_rows = TORCH_EXACT_ROWS

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, act_dtype: torch.dtype,
                 min_: torch.Tensor | None = None):
        codes = unpack_int4(packed).to(torch.int32)
        out, cols = codes.shape
        self.group = cols // scale.shape[1]
        self.weight = aligned(torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1))
        # torch's (code - 8) * scale + offset: ours (code - zero) * scale, or code * scale + min
        zero_f = min_.float() + 8.0 * scale.float() if min_ is not None else (8.0 - zero.float()) * scale.float()
        # [in/g, out, 2]: (scale, zero) per group and output channel.
        self.scales_zeros = aligned(torch.stack([scale.float().t(), zero_f.t()], dim=-1).to(act_dtype))
        self.act_dtype, self.out = act_dtype, out
        self.nbytes = self.weight.numel() * self.weight.element_size() + self.scales_zeros.numel() * \
            self.scales_zeros.element_size()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(self.act_dtype), self.weight, self.group,
                                              self.scales_zeros).to(x.dtype)
        return y if residual is None else residual + y


class CmxInt8Linear:
    """int8 through codexmini's kernel: the file's codes and (fp16 or fp32) scales as they are. `int8_act`: decode
    rows are quantized to int8 per 32 columns and multiplied in integers (else fp32, equal to the dequantized
    reference)."""

    def __init__(self, ext, codes: torch.Tensor, scale: torch.Tensor, int8_act: bool = False):
        # unaligned loads only: the file's tensors are used in place (no copy)
        self.ext, self.codes, self.scale, self.int8_act = ext, codes.contiguous(), _kernel_scale(scale), int8_act
        self.nbytes = self.codes.numel() + self.scale.numel() * self.scale.element_size()
        self.exact_rows = ext.gemv_rows()  # the GEMV's rows, each exactly as alone (more: the tiled GEMM)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.ext.q8_linear(x.float().contiguous(), self.codes, self.scale, residual, self.int8_act)


class CmxGroupLinear:
    """int4 / int3 / int2 groups through codexmini's kernels: the file's packed codes, scales (fp16 or fp32) and,
    for asymmetric layers, zero points as they are; a symmetric layer passes an empty zero (the implied middle
    code), a `_min` layer its float16 mins in the zero's place (the kernels tell them by dtype). `panels`: fed int8
    activations, where `panel_layout` allows, the codes are repacked (`to_panels`, `to_lowbit_panels`) for the
    panel kernels (`q4p_linear`, `q3p_linear`, `q2p_linear`)."""

    def __init__(self, ext, bits: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 int8_act: bool = False, min_: torch.Tensor | None = None, panels: bool = True):
        self.ext, self.bits, self.int8_act = ext, bits, int8_act
        self.packed, self.scale = packed.contiguous(), _kernel_scale(scale)
        offsets = min_.half() if min_ is not None else zero
        self.zero = offsets.contiguous() if offsets is not None else torch.empty(0, dtype=torch.uint8)
        self.nbytes = self.packed.numel() + self.scale.numel() * self.scale.element_size() + \
            self.zero.numel() * self.zero.element_size()
        self.panels = panels and int8_act and panel_layout(ext, bits, self.packed, self.scale)
        # the tensors as given (the file's, when mapped): what a repack leaves unread (`Runtime` releases their pages)
        self.sources = (self.packed, self.scale, self.zero)
        if self.panels:
            rows = ext.panels()
            self.packed = to_panels(self.packed, rows, 4) if bits == 4 else to_lowbit_panels(self.packed, bits, rows)
            self.scale = to_panels(self.scale, rows)
            self.zero = to_panels(self.zero, rows) if self.zero.numel() else self.zero
            kernel = getattr(ext, f"q{bits}p_linear")
            self._call = lambda x, packed, scale, zero, residual, _: kernel(x, packed, scale, zero, residual)
        else:
            self._call = getattr(ext, f"q{bits}_linear")
        # the most rows a call computes each exactly as it is alone (the GEMVs'; more take the tiled GEMM)
        self.exact_rows = ext.panel_gemv_rows() if self.panels else ext.gemv_rows()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(x.float().contiguous(), self.packed, self.scale, self.zero, residual, self.int8_act)


def panel_layout(ext, bits: int, packed: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether an int4 / int3 / int2 layer takes the panel kernels here: the kernels' own rule (`ext.panel_layout`: a
    build with AVX-512 VNNI, rows in whole panels, 32-column blocks of int8 activations tiling the row, groups that
    nest in those blocks (int4: 8, 16; int3 / int2: 16) or are made of them (32, 64, ...))."""
    if bits not in (2, 3, 4) or scale.dim() != 2 or not scale.shape[1] or packed.shape[1] * 8 % bits:
        return False
    cols = packed.shape[1] * 8 // bits
    return ext.panel_layout(packed.shape[0], cols, cols // scale.shape[1] if cols % scale.shape[1] == 0 else 0, bits)


def to_panels(t: torch.Tensor, rows: int, word: int = 1) -> torch.Tensor:
    """A per-row tensor `[out, n]` (int4 codes, scales, zero points or mins) in the panel kernel's order, same shape
    and bytes: per panel of `rows` output rows, each unit of `word` elements (4 bytes of int4 codes: 8 columns; one
    scale) of every row side by side, so that one vector load holds that unit of `rows` output channels."""
    out, n = t.shape
    return t.reshape(out // rows, rows, n // word, word).transpose(1, 2).contiguous().reshape(out, n)


def to_lowbit_panels(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """An int3 / int2 layer's portable codes `[out, in*bits/8]` in the panel kernels' order, same shape and size: per
    panel of `rows` output rows and step of 16 columns, the rows' 4 low-plane bytes side by side (the portable int2
    bytes: column 4j+k in bits 2k of byte j), then for int3 the step's high bits as 4 masks of 64 bits (mask k: bit
    4l + j = the high bit of row l's column 16s + 4j + k), so that field k of the low bytes is a vector of `rows`
    channels x 4 codes and mask k goes straight into a mask register."""
    out, nbytes = packed.shape
    cols = nbytes * 8 // bits
    panels, steps = out // rows, cols // 16
    low = packed[:, :cols // 4].reshape(panels, rows, steps, 4).transpose(1, 2).reshape(panels, steps, 4 * rows)
    if bits == 2:
        return low.contiguous().reshape(out, nbytes)
    shifts = torch.arange(8, dtype=torch.uint8)
    high = (packed[:, cols // 4:].unsqueeze(-1) >> shifts) & 1  # [out, cols/8, 8]: column 8j+k's high bit at [j, k]
    high = high.reshape(panels, rows, steps, 4, 4)  # [p, l, s, j, k]: column 16s + 4j + k
    masks = high.permute(0, 2, 4, 1, 3).reshape(panels, steps, 4, 4 * rows // 8, 8)  # bit 4l + j, 8 to a byte
    masks = (masks << shifts).sum(-1, dtype=torch.uint8)  # (distinct bits: the sum is their or)
    return torch.cat([low, masks.reshape(panels, steps, -1)], dim=-1).contiguous().reshape(out, nbytes)


def _kernel_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scales as the cmx kernels read them in place: fp16 or fp32 (bf16, which no file writes, widened)."""
    return scale.contiguous() if scale.dtype in (torch.float16, torch.float32) else scale.float().contiguous()


def resolve_mode(mode: str) -> str:
    """"auto" -> "cmx" where codexmini's kernels build here, else "native"; other modes are checked and kept."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"runtime kernel mode {mode!r} is not one of {KERNEL_MODES}")
    if mode == "auto":
        from . import native

        return "cmx" if native.load() is not None else "native"
    if mode == "cmx":
        from . import native

        if native.load() is None:
            raise RuntimeError(f"kernels='cmx': codexmini's CPU kernels could not be built ({native.load_error()}); "
                               "use kernels='native' or install a C++ compiler and ninja")
    return mode


def resolve_act(mode: str, act: str) -> str:
    """The activations a (resolved) kernel mode is fed: "auto" -> its fast choice; one it cannot take is refused."""
    if act not in ACT_DTYPES:
        raise ValueError(f"runtime act_dtype {act!r} is not one of {ACT_DTYPES}")
    act = FAST_ACT[mode] if act == "auto" else act
    allowed = {"cmx": ("float32", "int8"), "native": ("float32", "bfloat16"), "dequant": ("float32",)}[mode]
    if act not in allowed:
        raise ValueError(f"runtime act_dtype {act!r} does not apply to kernels={mode!r} (it takes {allowed})")
    return act


def make_linear(tensors: dict, name: str, scheme: str | None, mode: str = "native", act: str = "float32",
                panels: bool = True):
    """The kernel object for linear layer `name` (float when `scheme` is None); `act`: see `resolve_act`; `panels`:
    whether a cmx int4 / int3 / int2 layer may be repacked for the panel kernels (see `CmxGroupLinear`)."""
    mode = resolve_mode(mode)
    act = resolve_act(mode, act)
    if scheme is None:
        return FloatLinear(tensors[name + ".weight"])
    if mode == "dequant":
        return FloatLinear(dequantize(tensors, name, scheme))
    q = tensors[name + ".qweight"]
    s = Scheme(scheme)
    group = s.group_size
    if mode == "cmx":
        from . import native

        ext = native.load()
        if s.bits == 8:
            return CmxInt8Linear(ext, q, tensors[name + ".scale"], act == "int8")
        # every valid group size runs (a multiple of ext.block(bits) takes the SIMD code)
        return CmxGroupLinear(ext, s.bits, q, tensors[name + ".scale"], tensors.get(name + ".zero"), act == "int8",
                              tensors.get(name + ".min"), panels)
    if s.bits in (2, 3) or (group is not None and (group not in INT4_KERNEL_GROUPS or q.shape[0] % 16)):
        return FloatLinear(dequantize(tensors, name, scheme))  # what torch's int kernels do not take
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[act]
    if scheme == "int8":
        return Int8Linear(q, tensors[name + ".scale"].float(), dtype)
    if s.stores_min:
        return Int4Linear(q, tensors[name + ".scale"], None, dtype, tensors[name + ".min"])
    return Int4Linear(q, tensors[name + ".scale"], zero_of(tensors, name, scheme), dtype)


class CmxConcatLinear:
    """Several cmx int layers that read the same input, in one call, their outputs side by side; each keeps its own
    tensors (the file's, or its panels: no concatenated copy of the weights)."""

    def __init__(self, parts: list):
        self.parts, self.int8_act = parts, parts[0].int8_act
        self.nbytes = sum(p.nbytes for p in parts)
        self.exact_rows = min(p.exact_rows for p in parts)
        ext = parts[0].ext
        if isinstance(parts[0], CmxGroupLinear) and all(p.panels for p in parts):
            cat = getattr(ext, f"q{parts[0].bits}p_linear_cat")
            self._call = lambda x, qs, ss, zs, _, silu=False: cat(x, qs, ss, zs, silu)
            self._args = ([p.packed for p in parts], [p.scale for p in parts], [p.zero for p in parts])
        elif isinstance(parts[0], CmxGroupLinear):
            if any(p.panels for p in parts):
                raise ValueError("CmxConcatLinear: the parts must all be in panels or none (make_fused_linear "
                                 "builds them so)")
            self._call = getattr(ext, f"q{parts[0].bits}_linear_cat")
            self._args = ([p.packed for p in parts], [p.scale for p in parts], [p.zero for p in parts])
        else:
            self._call = ext.q8_linear_cat
            self._args = ([p.codes for p in parts], [p.scale for p in parts])

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self._call(x.float().contiguous(), *self._args, self.int8_act)
        return y if residual is None else residual + y

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of two parts (gate, up) in one call: a prompt never holds their concatenated output."""
        return self._call(x.float().contiguous(), *self._args, self.int8_act, True)


def make_fused_linear(tensors: dict, names: list[str], schemes: dict, mode: str = "native", act: str = "float32"):
    """One kernel for several linear layers that read the same input (q/k/v, gate/up), so decoding makes one call
    instead of several: for cmx int layers and float layers the parts side by side (no copy), otherwise (torch's
    int kernels, which repack the weights anyway) their rows concatenated. None when their schemes differ."""
    kinds = {schemes.get(n) for n in names}
    if len(kinds) != 1:
        return None
    scheme = kinds.pop()
    if scheme is None:  # float weights are used as the file maps them: a concatenated copy would double them
        return FloatConcatLinear([FloatLinear(tensors[n + ".weight"]) for n in names])
    if resolve_mode(mode) == "cmx":
        from . import native

        ext = native.load()  # one layout for every part: panels only where all of them take it
        panels = all(panel_layout(ext, Scheme(scheme).bits, tensors[n + ".qweight"], tensors[n + ".scale"])
                     for n in names)
        parts = [make_linear(tensors, n, scheme, mode, act, panels) for n in names]
        if all(isinstance(p, (CmxGroupLinear, CmxInt8Linear)) for p in parts):
            return CmxConcatLinear(parts)
    fused = {"fused" + p: torch.cat([tensors[n + p] for n in names], dim=0) for p in (".qweight", ".scale")}
    if Scheme(scheme).stores_min:
        fused["fused.min"] = torch.cat([tensors[n + ".min"] for n in names], dim=0)
    elif scheme != "int8":
        fused["fused.zero"] = torch.cat([zero_of(tensors, n, scheme) for n in names], dim=0)
    return make_linear(fused, "fused", scheme, mode, act)
