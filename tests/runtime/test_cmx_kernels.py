"""codexmini's own CPU kernels (runtime/csrc/cmx_kernels.cpp) and the runtime's linear kernels against the
`codexmini.ops` functions they replace (dequantization, RMSNorm, RoPE, feature maps, linear / hybrid attention)."""

import pytest
import torch

from codexmini.export.to_cmx import export_cmx
from codexmini.ops.feature_maps import hedgehog_feature_map
from codexmini.ops.hybrid import hybrid_attn, naive_hybrid_attn
from codexmini.ops.layouts import Scheme, dequantize, dequantize_int8
from codexmini.ops.linear_attn import normalise, recurrent_linear_attn
from codexmini.ops.norm import rms_norm
from codexmini.ops.rope import apply_rope
from codexmini.quantize import QuantizeConfig, quantize_model
from codexmini.runtime import Runtime, native
from codexmini.runtime.kernels import (CmxConcatLinear, CmxGroupLinear, make_fused_linear, make_linear, resolve_act,
                                      resolve_mode, to_lowbit_panels, to_panels)
from tests.runtime.test_runtime import _model

ext = native.load()
needs_ext = pytest.mark.skipif(ext is None, reason=f"codexmini kernels not built: {native.load_error()}")
GEMV_ROWS = ext.gemv_rows() if ext is not None else 8  # inputs of up to this many rows take the GEMVs (decoding)


def test_kernels_build_wherever_a_compiler_exists():
    """The fallback is for machines without a compiler: with one, a failed build is a bug, not a skip."""
    import os
    import shutil

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    assert ext is not None, native.load_error()
    assert ext.isa() in ("avx512-vnni", "avx512", "avx2", "generic")


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """The reference for the kernels' int8 activations: each 32 columns scaled to [-127, 127] by their absolute max,
    rounded to nearest even, scaled back."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, torch.round(xb / d.clamp_min(1e-30)), torch.zeros_like(xb))
    return (xq * d).reshape(x.shape)


def fast_prompt_product(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The reference for a prompt (more than GEMV_ROWS rows) with the fast activations: where the kernels were built for a
    CPU with bf16 dot products, bf16-rounded activations and weights, the product rounded to bf16; else fp32."""
    if ext is None or not ext.bf16_prompts():
        return x @ W.t()
    return (x.bfloat16().float() @ W.bfloat16().float().t()).bfloat16().float()


BF16_TOL = dict(rtol=2 ** -7)  # one bf16 rounding of the product, taken in another summation order


def _int4(N, K, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"w.qweight": torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
         "w.scale": torch.rand(N, K // G, generator=g) * 0.1,
         "w.zero": torch.randint(0, 16, (N, K // G), dtype=torch.uint8, generator=g)}
    return t, dequantize(f"int4_g{G}", t["w.qweight"], t["w.scale"], t["w.zero"])


@needs_ext
@pytest.mark.parametrize("N, K, G", [(96, 64, 32), (37, 128, 64), (200, 576, 32), (64, 256, 128), (600, 64, 32)])
# one row and up to GEMV_ROWS take the GEMV (eight rows a pass: 19 is three passes), more the tiled GEMM
@pytest.mark.parametrize("M", [1, 3, 8, 19, GEMV_ROWS + 1])
def test_int4_kernel_equals_dequantized_reference(N, K, G, M):
    t, W = _int4(N, K, G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    want = x @ W.t()
    got = ext.q4_linear(x, t["w.qweight"], t["w.scale"], t["w.zero"])
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    r = torch.randn(M, N)
    torch.testing.assert_close(ext.q4_linear(x, t["w.qweight"], t["w.scale"], t["w.zero"], r), want + r,
                               atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    # int8 activations: up to GEMV_ROWS rows take the integer path, equal to int8-rounded activations times the
    # dequantized weight; more rows (prompts) run in bf16 where the CPU multiplies bf16 natively, else exact fp32
    got = ext.q4_linear(x, t["w.qweight"], t["w.scale"], t["w.zero"], r, True)
    if M <= GEMV_ROWS:
        torch.testing.assert_close(got, int8_activations(x) @ W.t() + r, atol=1e-5 * want.abs().max().item(),
                                   rtol=1e-5)
    else:  # prompts: bf16 where the CPU multiplies bf16 natively
        torch.testing.assert_close(got, fast_prompt_product(x, W) + r, atol=1e-5 * want.abs().max().item(),
                                   **BF16_TOL)
    if M <= GEMV_ROWS or ext.bf16_prompts():  # and the rounding is visible: the fast path is not silently the fp32 one
        assert (got - want - r).abs().max() > 1e-4 * want.abs().max()


@needs_ext
@pytest.mark.parametrize("N, K", [(33, 40), (300, 64), (1000, 576), (70, 96)])
@pytest.mark.parametrize("M", [1, 2, 8, 19, GEMV_ROWS + 1])
@pytest.mark.parametrize("half", [False, True], ids=["fp32_scale", "fp16_scale"])
def test_int8_kernel_equals_dequantized_reference(N, K, M, half):
    """Per-channel int8 with fp32 scales (older files) or fp16 ones (the portable layout's, read in place), signed."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = (torch.rand(N, generator=g) - 0.3) * 0.01
    s = s.half() if half else s
    x = torch.randn(M, K, generator=g)
    W = dequantize_int8(q, s)
    want = x @ W.t()
    torch.testing.assert_close(ext.q8_linear(x, q, s), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    r = torch.randn(M, N)
    torch.testing.assert_close(ext.q8_linear(x, q, s, r), want + r, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    if K % 32 == 0 and M <= GEMV_ROWS:
        torch.testing.assert_close(ext.q8_linear(x, q, s, None, True), int8_activations(x) @ W.t(),
                                   atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    if M > GEMV_ROWS:
        torch.testing.assert_close(ext.q8_linear(x, q, s, r, True), fast_prompt_product(x, W) + r,
                                   atol=1e-5 * want.abs().max().item(), **BF16_TOL)


@needs_ext
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("M", [1, 3, 9, GEMV_ROWS + 1])
@pytest.mark.parametrize("int8_act", [False, True])
def test_parts_side_by_side_and_fused_silu_equal_the_reference(scheme, M, int8_act):
    """q/k/v (parts of different heights, one over a tile of 256 rows) side by side, and gate/up fused into
    silu(gate) * up, against the dequantized parts concatenated."""
    heights = (300, 40, 40) if scheme == "int4" else (300, 40, 72)
    K = 64
    if scheme == "int4":
        ts = [_int4(N, K, 32, seed=i) for i, N in enumerate(heights)]
        args = ([t["w.qweight"] for t, _ in ts], [t["w.scale"] for t, _ in ts], [t["w.zero"] for t, _ in ts])
        Ws, call = [W for _, W in ts], ext.q4_linear_cat
    else:
        g = torch.Generator().manual_seed(3)
        qs = [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g) for N in heights]
        ss = [torch.rand(N, generator=g) * 0.01 for N in heights]
        args, Ws, call = (qs, ss), [dequantize_int8(q, s) for q, s in zip(qs, ss)], ext.q8_linear_cat
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4))

    def product(W):
        if not int8_act:
            return x @ W.t()
        return int8_activations(x) @ W.t() if M <= GEMV_ROWS else fast_prompt_product(x, W)

    want = product(torch.cat(Ws))
    tol = dict(atol=1e-5 * want.abs().max().item(), rtol=BF16_TOL["rtol"] if int8_act and M > GEMV_ROWS else 1e-5)
    torch.testing.assert_close(call(x, *args, int8_act), want, **tol)
    # gate and up: two weights of equal height (the first part, and its rows reversed)
    pair = tuple([a[0], a[0].flip(0).contiguous()] for a in args)
    gate, up = product(Ws[0]), product(Ws[0].flip(0))
    torch.testing.assert_close(call(x, *pair, int8_act, True), torch.nn.functional.silu(gate) * up, **tol)


@needs_ext
@pytest.mark.parametrize("M", [1, 3])
def test_int4_fp16_scales_and_implied_zero_equal_the_fp32_layout(M):
    """The portable layout's int4 (fp16 scales, no zero tensor: the implied 8) and the same weight as older files
    store it (fp32 scales, a zero tensor of 8s) give the same output, with both activation paths."""
    t, _ = _int4(64, 256, 32)
    half = t["w.scale"].half()
    eights = torch.full_like(t["w.zero"], 8)
    x = torch.randn(M, 256)
    for int8_act in (False, True):
        torch.testing.assert_close(ext.q4_linear(x, t["w.qweight"], half, torch.empty(0, dtype=torch.uint8), None,
                                                 int8_act),
                                   ext.q4_linear(x, t["w.qweight"], half.float(), eights, None, int8_act))


@needs_ext
def test_bad_kernel_inputs_are_refused_with_the_reason():
    t, _ = _int4(64, 128, 32)
    with pytest.raises(RuntimeError, match="input has 64 columns, the weight expects 128"):
        ext.q4_linear(torch.randn(1, 64), t["w.qweight"], t["w.scale"], t["w.zero"])
    with pytest.raises(RuntimeError, match="zero must be"):
        ext.q4_linear(torch.randn(1, 128), t["w.qweight"], t["w.scale"], t["w.zero"][:, :1].contiguous())
    with pytest.raises(RuntimeError, match="float32"):
        ext.q8_linear(torch.randn(1, 8).double(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))


PANELS = ext.panels() if ext is not None else 0
PANEL_ROWS = ext.panel_gemv_rows() if PANELS else 0  # inputs of up to this many rows take the panel GEMV
needs_panels = pytest.mark.skipif(not PANELS, reason="the panel kernels need a build with AVX-512 VNNI")


def _panel_weight(N, K, G, mode, half, seed=0, bits=4):
    """An int4 / int3 / int2 layer's portable tensors (codes, scale, and zero points / mins / nothing), the same in
    panels, and ops' dequantized weight."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (N, K * bits // 8), dtype=torch.uint8, generator=g)  # any byte is valid codes
    s = torch.rand(N, K // G, generator=g) * 0.1
    s = s.half() if half else s
    offsets = {"sym": torch.empty(0, dtype=torch.uint8),
               "asym": torch.randint(0, 2 ** bits, (N, K // G), dtype=torch.uint8, generator=g),
               "min": ((torch.rand(N, K // G, generator=g) - 0.5) * 0.8).half()}[mode]
    scheme = f"int{bits}_g{G}" + {"sym": "", "asym": "_asym", "min": "_min"}[mode]
    W = dequantize(scheme, q, s, offsets if mode == "asym" else None, offsets if mode == "min" else None)
    codes = to_panels(q, PANELS, 4) if bits == 4 else to_lowbit_panels(q, bits, PANELS)
    panel = (codes, to_panels(s, PANELS), to_panels(offsets, PANELS) if offsets.numel() else offsets)
    return (q, s, offsets), panel, W


@needs_panels
@pytest.mark.parametrize("bits, G", [(4, 8), (4, 16), (4, 32), (4, 64), (4, 128), (3, 16), (3, 32), (3, 128),
                                     (2, 16), (2, 32), (2, 64)])
@pytest.mark.parametrize("mode", ["sym", "asym", "min"])
@pytest.mark.parametrize("half", [True, False], ids=["fp16_scale", "fp32_scale"])
def test_panels_equal_the_int8_activation_reference(bits, G, mode, half):
    """The panel kernels (up to PANEL_ROWS rows: int8 activations; prompts too where the CPU has no AMX) equal
    int8-rounded activations times ops' dequantized weight, and the portable-layout kernel with int8 activations (for
    decoding rows); longer inputs (the tiled GEMM over the panels' dequantization) equal the fast prompt product.
    Every row of a batch is bit for bit the row alone."""
    N, K = 96, 256
    portable, panel, W = _panel_weight(N, K, G, mode, half, bits=bits)
    kernel, reference = getattr(ext, f"q{bits}p_linear"), getattr(ext, f"q{bits}_linear")
    gen = torch.Generator().manual_seed(7)
    for M in (1, 3, 8, 19, GEMV_ROWS + 1):
        x = torch.randn(M, K, generator=gen)
        r = torch.randn(M, N, generator=gen)
        got = kernel(x, *panel, r)
        want = (int8_activations(x) @ W.t() if M <= PANEL_ROWS else fast_prompt_product(x, W)) + r
        tol = dict(atol=1e-5 * want.abs().max().item(), rtol=1e-5 if M <= PANEL_ROWS else BF16_TOL["rtol"])
        torch.testing.assert_close(got, want, **tol)
        if M <= GEMV_ROWS:  # (19 rows: three chunks of rows of x, each row still exactly as alone)
            torch.testing.assert_close(got, reference(x, *portable, r, True), **tol)
            alone = torch.cat([kernel(x[m:m + 1], *panel) for m in range(M)])
            assert torch.equal(kernel(x, *panel), alone)


@needs_panels
@pytest.mark.parametrize("bits, G", [(4, 8), (4, 32), (3, 16), (3, 64), (2, 32)])
@pytest.mark.parametrize("mode", ["sym", "asym", "min"])
def test_panels_dequantize_to_the_reference(bits, G, mode):
    """The panels' fp32 rows (what a long prompt multiplies on a CPU with AMX, tested here on any CPU with the panel
    kernels) equal ops' dequantization of the portable layout."""
    _, panel, W = _panel_weight(48, 128, G, mode, True, seed=5, bits=bits)
    torch.testing.assert_close(ext.panel_dequant(*panel, bits), W, rtol=1e-6, atol=1e-7)


@needs_panels
@pytest.mark.parametrize("bits", [3, 2])
def test_lowbit_panels_hold_the_same_codes(bits):
    """to_lowbit_panels reorders bytes and bits without losing any: every code of the portable layout is where the
    kernel reads it (checked through a weight of one-hot rows: each output picks one column's code)."""
    N, K, G = 32, 64, 32
    (q, s, _), (codes, scale, _), W = _panel_weight(N, K, G, "min", False, seed=3, bits=bits)
    ones = torch.ones(N, K // G, dtype=torch.float32)
    zero_min = torch.zeros(N, K // G).half()  # w = code exactly
    for col in (0, 5, 17, 63):
        x = torch.zeros(1, K)
        x[0, col] = 1.0  # int8 activations hold 1.0 exactly (127 * 1/127)
        got = getattr(ext, f"q{bits}p_linear")(x, codes, to_panels(ones, PANELS), to_panels(zero_min, PANELS))
        want = dequantize(f"int{bits}_g{G}_min", q, ones, None, zero_min)[:, col]
        torch.testing.assert_close(got[0], want, rtol=1e-6, atol=1e-6)


@needs_panels
@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("M", [1, 5, GEMV_ROWS + 1, 300])  # 300: a fused gate/up in two slabs of rows
def test_panels_side_by_side_and_fused_silu_equal_the_reference(M, bits):
    """q/k/v-like parts of different heights (whole panels), group sizes and offsets in one call, and gate/up into
    silu(gate) * up."""
    K = 128
    parts = [_panel_weight(N, K, G, mode, True, seed=i, bits=bits)
             for i, (N, G, mode) in enumerate(((160, 32, "sym"), (32, 16, "asym"), (48, 64, "min")))]
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(8))

    def product(W):
        return int8_activations(x) @ W.t() if M <= PANEL_ROWS else fast_prompt_product(x, W)

    args = tuple([p[1][i] for p in parts] for i in range(3))
    want = product(torch.cat([p[2] for p in parts]))
    tol = dict(atol=1e-5 * want.abs().max().item(), rtol=BF16_TOL["rtol"] if M > PANEL_ROWS else 1e-5)
    torch.testing.assert_close(getattr(ext, f"q{bits}p_linear_cat")(x, *args), want, **tol)
    gate, up = parts[0], _panel_weight(160, K, 32, "sym", True, seed=9, bits=bits)
    pair = tuple([gate[1][i], up[1][i]] for i in range(3))
    want = torch.nn.functional.silu(product(gate[2])) * product(up[2])
    torch.testing.assert_close(getattr(ext, f"q{bits}p_linear_cat")(x, *pair, True), want, **tol)


@needs_panels
def test_the_runtime_puts_int_layers_in_panels_only_where_the_kernel_takes_them():
    """int8 activations and whole panels: repacked (and fused parts all alike); fp32 activations, or rows that are
    not whole panels, keep the file's layout. Both give the reference's products."""
    t, _ = _int4(64, 128, 32)
    t.pop("w.zero")  # symmetric
    W = dequantize("int4_g32", t["w.qweight"], t["w.scale"])
    x = torch.randn(2, 128)
    fast = make_linear(t, "w", "int4_g32", "cmx", "int8")
    exact = make_linear(t, "w", "int4_g32", "cmx", "float32")
    assert isinstance(fast, CmxGroupLinear) and fast.panels and not exact.panels
    assert not torch.equal(fast.packed, t["w.qweight"])  # the same bytes in another order
    assert torch.equal(fast.packed.flatten().sort().values, t["w.qweight"].flatten().sort().values)
    torch.testing.assert_close(fast(x), int8_activations(x) @ W.t(), atol=1e-5 * W.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(exact(x), x @ W.t(), atol=1e-5, rtol=1e-5)
    for bits in (3, 2):  # int3 / int2 too, in their own panel order
        (q, s, _), _, Wb = _panel_weight(64, 128, 32, "sym", True, seed=bits, bits=bits)
        low = make_linear({"w.qweight": q, "w.scale": s}, "w", f"int{bits}_g32", "cmx", "int8")
        assert low.panels and not torch.equal(low.packed, q) and low.packed.shape == q.shape
        torch.testing.assert_close(low(x), int8_activations(x) @ Wb.t(), atol=1e-5 * Wb.abs().max().item(), rtol=1e-5)
    t40, _ = _int4(40, 128, 32, seed=3)  # 40 rows: not whole panels, and so neither is a part fused with it
    t40.pop("w.zero")
    assert not make_linear(t40, "w", "int4_g32", "cmx", "int8").panels
    both = {f"{n}{k[1:]}": v for n, tt in (("a", t), ("b", t40)) for k, v in tt.items()}
    fused = make_fused_linear(both, ["a", "b"], {"a": "int4_g32", "b": "int4_g32"}, "cmx", "int8")
    assert isinstance(fused, CmxConcatLinear) and not any(p.panels for p in fused.parts)


@needs_panels
def test_bad_panel_inputs_are_refused_with_the_reason():
    (q, s, _), _, _ = _panel_weight(32, 128, 32, "sym", True)
    with pytest.raises(RuntimeError, match="N must be a multiple of 16"):
        ext.q4p_linear(torch.randn(1, 128), q[:24].contiguous(), s[:24].contiguous(), torch.empty(0, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="group size 4"):
        ext.q4p_linear(torch.randn(1, 128), q, torch.ones(32, 32).half(), torch.empty(0, dtype=torch.uint8))


def _layer(scheme, N, K, seed):
    """A quantized layer's .cmx tensors (named `w.*`) with random codes, and ops' dequantized weight."""
    if scheme == "int8":
        g = torch.Generator().manual_seed(seed)
        t = {"w.qweight": torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g),
             "w.scale": torch.rand(N, generator=g) * 0.01}
        return t, dequantize(scheme, t["w.qweight"], t["w.scale"])
    return _int4(N, K, Scheme(scheme).group_size, seed)


@pytest.mark.parametrize("mode", ["native", "dequant"] + (["cmx"] if ext is not None else []))
@pytest.mark.parametrize("scheme", ["int8", "int4_g32", "int4_g16"])
@pytest.mark.parametrize("M", [1, 7])
def test_every_linear_kernel_equals_ops_dequantize(mode, scheme, M):
    """Each kernel mode's layer (torch's int8 / int4 kernels, codexmini's, weights widened at load, and the fallback
    for a group size a kernel cannot take), alone and fused with a second layer reading the same input, on fp32
    activations equals `x @ W^T` with ops' dequantized W."""
    N, K = 48, 64
    (ta, Wa), (tb, Wb) = _layer(scheme, N, K, 10), _layer(scheme, 32, K, 11)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(12))
    want = x @ Wa.t()
    tol = dict(atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(make_linear(ta, "w", scheme, mode, "float32")(x), want, **tol)
    both = {f"{n}{k[1:]}": v for n, t in (("a", ta), ("b", tb)) for k, v in t.items()}
    fused = make_fused_linear(both, ["a", "b"], {"a": scheme, "b": scheme}, mode, "float32")
    torch.testing.assert_close(fused(x), x @ torch.cat([Wa, Wb]).t(), **tol)


@needs_ext
def test_group_size_the_kernel_cannot_take_falls_back_to_dequantized_weights():
    t, W = _int4(32, 64, 8)  # group 8 is below the SIMD block
    lin = make_linear(t, "w", "int4_g8", "cmx")
    x = torch.randn(2, 64)
    torch.testing.assert_close(lin(x), x @ W.t())


@needs_ext
@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g32_asym", "int8"])
def test_runtime_decode_with_cmx_kernels_equals_the_dequantized_model(scheme, tiny_tokenizer, tmp_path):
    model = _model(layer_types=["softmax", "hybrid", "linear"], num_hidden_layers=3, hidden_size=64,
                   intermediate_size=128,
                   tie_word_embeddings=False)
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default=scheme,
                                                    rules=[{"pattern": "lm_head", "scheme": "int8"}]))
    path = export_cmx(model, tiny_tokenizer, tmp_path / "q.cmx")
    P = GEMV_ROWS + 8  # a prompt longer than the GEMVs take
    ids = torch.randint(4, 300, (1, P + 22), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits[0]
    for act in ("float32", "auto"):
        rt = Runtime(path, kernels="cmx", act_dtype=act)
        assert rt.kernels == "cmx" and rt.act_dtype == {"float32": "float32", "auto": "int8"}[act]
        s = rt.new_session()
        # the prompt (tiled GEMM), a 12-token step (two passes of the GEMV), a 3-token step (one pass), then token by
        # token (one-row GEMV)
        got = [rt.forward(ids[0, :P], s, all_logits=True), rt.forward(ids[0, P:P + 12], s, all_logits=True),
               rt.forward(ids[0, P + 12:P + 15], s, all_logits=True)]
        got += [rt.forward(ids[0, t:t + 1], s, all_logits=True) for t in range(P + 15, P + 22)]
        got = torch.cat(got)
        if act == "float32":  # exact: the dequantized reference
            torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-3)
        else:  # fast activations: int8 while decoding, bf16 prompts where the CPU multiplies bf16 natively, int8
            # prompts for int4 layers in panels
            if not ext.bf16_prompts() and not (PANELS and scheme.startswith("int4")):  # the prompt stays exact
                torch.testing.assert_close(got[:P], want[:P], atol=5e-4, rtol=1e-3)
            assert (got - want).abs().max() < 0.02 * want.abs().max()
            assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_kernel_mode_and_activation_names_are_checked():
    with pytest.raises(ValueError, match="runtime kernel mode 'fast'"):
        resolve_mode("fast")
    with pytest.raises(ValueError, match="act_dtype 'fp8'"):
        resolve_act("native", "fp8")
    with pytest.raises(ValueError, match="act_dtype 'int8' does not apply to kernels='native'"):
        resolve_act("native", "int8")
    assert resolve_act("cmx", "auto") == "int8" and resolve_act("native", "auto") == "bfloat16"
    assert resolve_mode("auto") == ("cmx" if ext is not None else "native")


@needs_ext
def test_fused_layer_steps_equal_their_ops_references():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 48, generator=g), torch.randn(48, generator=g)
    torch.testing.assert_close(ext.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))
    # rotary on the first (query + key) heads of a fused q/k/v row, in place; v untouched
    H, KV, hd, T = 4, 2, 16, 3
    qkv = torch.randn(T, (H + 2 * KV) * hd, generator=g)
    ang = torch.randn(T, hd // 2, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    want = qkv.clone()
    qk = want[:, :(H + KV) * hd].reshape(T, H + KV, hd).transpose(0, 1)
    want[:, :(H + KV) * hd] = apply_rope(qk, cos, sin).transpose(0, 1).reshape(T, -1)
    ext.rope_(qkv, cos, sin, H + KV, hd)
    torch.testing.assert_close(qkv, want)
    # 37 columns: two 16-lane vectors and a scalar tail; gates far out on both sides (e^-g would overflow if
    # computed as it is written), zero, and a NaN that stays NaN
    gu = torch.randn(3, 74, generator=g) * 4
    gu[0, :6] = torch.tensor([-200.0, -90.0, -30.0, 0.0, 30.0, 200.0])
    gu[1, 20] = float("nan")
    want = torch.nn.functional.silu(gu[:, :37]) * gu[:, 37:]
    torch.testing.assert_close(ext.silu_mul(gu), want, equal_nan=True)
    assert ext.silu_mul(gu)[1, 20].isnan() and not ext.silu_mul(gu)[0].isnan().any()
    xh, wh = torch.randn(3, 16, generator=g), torch.randn(3, 16, 8, generator=g)
    torch.testing.assert_close(ext.hedgehog(xh, wh), hedgehog_feature_map(xh[:, None], wh)[:, 0])
    for fh in (16, 64, 128):  # the vector path (whole vectors of features), projections far apart included
        xh, wh = torch.randn(6, 64, generator=g) * 3, torch.randn(3, 64, fh, generator=g)
        want = hedgehog_feature_map(xh.reshape(2, 3, 64).transpose(0, 1), wh).transpose(0, 1).reshape(6, 2 * fh)
        torch.testing.assert_close(ext.hedgehog(xh, wh), want)


@needs_ext
@pytest.mark.parametrize("window", [0, 5])
# hd 16: one head at a time; 32 / 64 / 128 (with AVX-512): the query heads of a KV head together, over blocks of 64
# keys (n = 200: several blocks, a partial one at the end)
@pytest.mark.parametrize("hd, n", [(16, 9), (64, 9), (64, 200), (32, 70), (128, 130)])
def test_one_token_attention_equals_sdpa_over_the_cache(window, hd, n):
    g = torch.Generator().manual_seed(6)
    H, KV, cap = 6, 2, n + 23
    kc, vc = torch.randn(KV, cap, hd, generator=g), torch.randn(KV, cap, hd, generator=g)
    qkv = torch.randn(1, (H + 2 * KV) * hd, generator=g)
    out = ext.attend_decode(qkv, kc, vc, n, H, KV, hd, hd ** -0.5, window)
    q = qkv[0, :H * hd].reshape(H, 1, hd)
    torch.testing.assert_close(kc[:, n], qkv[0, H * hd:(H + KV) * hd].reshape(KV, hd))  # appended in place
    torch.testing.assert_close(vc[:, n], qkv[0, (H + KV) * hd:].reshape(KV, hd))
    lo = max(0, n + 1 - window) if window else 0
    K, V = kc[:, lo:n + 1].repeat_interleave(H // KV, 0), vc[:, lo:n + 1].repeat_interleave(H // KV, 0)
    want = torch.nn.functional.scaled_dot_product_attention(q, K, V, scale=hd ** -0.5)
    torch.testing.assert_close(out, want.reshape(1, H * hd))
    with pytest.raises(RuntimeError, match="outside the cache capacity"):
        ext.attend_decode(qkv, kc, vc, cap, H, KV, hd, 1.0, 0)


@needs_ext
@pytest.mark.parametrize("window", [0, 5])
# hd 16: one head at a time; 64 with 90 rows after 40 cached: the grouped kernel over several key blocks, in parallel
@pytest.mark.parametrize("hd, n, T", [(16, 0, 7), (16, 5, 3), (64, 0, 1), (64, 40, 90)])
def test_a_prompt_chunk_attends_causally_as_token_by_token_decoding(window, hd, n, T):
    """attend_prompt: T rows after n cached tokens equal SDPA with a causal mask over the cache (the model's
    reference), and bit for bit attend_decode run on one row after another."""
    g = torch.Generator().manual_seed(10)
    H, KV, cap = 6, 2, n + T + 3
    kc, vc = torch.randn(KV, cap, hd, generator=g), torch.randn(KV, cap, hd, generator=g)
    qkv = torch.randn(T, (H + 2 * KV) * hd, generator=g)
    kd, vd = kc.clone(), vc.clone()
    got = ext.attend_prompt(qkv, kc, vc, n, H, KV, hd, hd ** -0.5, window)
    steps = torch.cat([ext.attend_decode(qkv[t:t + 1].clone(), kd, vd, n + t, H, KV, hd, hd ** -0.5, window)
                       for t in range(T)])
    torch.testing.assert_close(got, steps, rtol=0, atol=0)
    assert torch.equal(kc, kd) and torch.equal(vc, vd)  # the same keys and values written in place
    S, groups = n + T, H // KV
    pos = torch.arange(n, S)[:, None]
    keep = torch.arange(S)[None, :] <= pos
    if window:
        keep &= torch.arange(S)[None, :] > pos - window
    q = qkv[:, :H * hd].reshape(T, H, hd).transpose(0, 1)
    K, V = kc[:, :S].repeat_interleave(groups, 0), vc[:, :S].repeat_interleave(groups, 0)
    want = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=keep, scale=hd ** -0.5)
    torch.testing.assert_close(got, want.transpose(0, 1).reshape(T, H * hd))
    with pytest.raises(RuntimeError, match="outside the cache capacity"):
        ext.attend_prompt(qkv, kc, vc, cap - T + 1, H, KV, hd, 1.0, 0)


@needs_ext
@pytest.mark.parametrize("hd", [16, 64])
def test_a_nan_query_gives_a_nan_head_not_a_silent_number(hd):
    """A NaN in a query head (a diverged model) comes out as NaN for that head only, as SDPA gives it."""
    g = torch.Generator().manual_seed(9)
    H, KV, n = 6, 2, 40
    kc, vc = torch.randn(KV, n + 8, hd, generator=g), torch.randn(KV, n + 8, hd, generator=g)
    qkv = torch.randn(1, (H + 2 * KV) * hd, generator=g)
    qkv[0, hd + 3] = float("nan")  # head 1
    out = ext.attend_decode(qkv, kc, vc, n, H, KV, hd, hd ** -0.5, 0).reshape(H, hd)
    assert out[1].isnan().all() and not out[[0, 2, 3, 4, 5]].isnan().any()


@needs_ext
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("long", [False, True], ids=["one_thread", "parallel"])  # little work stays on one thread
@pytest.mark.parametrize("hd", [16, 64])
def test_attention_of_a_batch_equals_each_sequence_alone(window, long, hd):
    """attend_decode_batch: row b of qkv continues its own caches at its own slot, computed as attend_decode on it
    alone; a cache given twice is refused (two rows would write one slot)."""
    g = torch.Generator().manual_seed(8)
    H, KV = 6, 2
    ns = [900, 3, 250, 0] if long else [9, 3, 17, 0]
    caches = [(torch.randn(KV, n + 4, hd, generator=g), torch.randn(KV, n + 4, hd, generator=g)) for n in ns]
    qkv = torch.randn(len(ns), (H + 2 * KV) * hd, generator=g)
    alone = [(k.clone(), v.clone()) for k, v in caches]
    want = torch.cat([ext.attend_decode(qkv[b:b + 1].clone(), k, v, n, H, KV, hd, hd ** -0.5, window)
                      for b, ((k, v), n) in enumerate(zip(alone, ns))])
    got = ext.attend_decode_batch(qkv, [k for k, _ in caches], [v for _, v in caches], ns, H, KV, hd, hd ** -0.5,
                                  window)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (k, v), (ka, va) in zip(caches, alone):
        assert torch.equal(k, ka) and torch.equal(v, va)
    k, v = caches[0]
    with pytest.raises(RuntimeError, match="rows 0 and 1 share a cache"):
        ext.attend_decode_batch(qkv[:2].contiguous(), [k, k], [v, v], ns[:2], H, KV, hd, 1.0, 0)

@needs_ext
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("hd", [16, 64])
def test_attention_of_mixed_segments_equals_each_sequence_alone(window, hd):
    """attend_segments: prompt chunks and decoding rows of several sequences in one call (rows starts[b] ..
    starts[b+1] continue sequence b from slot ns[b]), bit for bit attend_prompt on each sequence's rows alone, with
    the same keys and values written; two segments on one cache and bad offsets are refused."""
    g = torch.Generator().manual_seed(11)
    H, KV = 6, 2
    ns, lens = [40, 3, 0, 250, 7], [60, 1, 5, 1, 0]  # a prompt after 40 cached, decoding rows, a first chunk, none
    caches = [(torch.randn(KV, n + t + 2, hd, generator=g), torch.randn(KV, n + t + 2, hd, generator=g))
              for n, t in zip(ns, lens)]
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
    qkv = torch.randn(starts[-1], (H + 2 * KV) * hd, generator=g)
    alone = [(k.clone(), v.clone()) for k, v in caches]
    want = torch.cat([ext.attend_prompt(qkv[a:b].clone(), k, v, n, H, KV, hd, hd ** -0.5, window)
                      for (k, v), n, a, b in zip(alone, ns, starts, starts[1:]) if b > a])
    got = ext.attend_segments(qkv, [k for k, _ in caches], [v for _, v in caches], ns, starts, H, KV, hd,
                              hd ** -0.5, window)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (k, v), (ka, va) in zip(caches, alone):
        assert torch.equal(k, ka) and torch.equal(v, va)
    k, v = caches[0]
    with pytest.raises(RuntimeError, match="rows 0 and 1 share a cache"):
        ext.attend_segments(qkv[:61].contiguous(), [k, k], [v, v], ns[:2], starts[:3], H, KV, hd, 1.0, 0)
    with pytest.raises(RuntimeError, match="starts must not decrease"):
        ext.attend_segments(qkv[:61].contiguous(), [k, caches[1][0]], [v, caches[1][1]], ns[:2], [0, 62, 61], H, KV,
                            hd, 1.0, 0)


@needs_ext
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("D", [8, 64, 200])
def test_linear_decode_step_equals_the_reference(decay, D):
    """One step of linear_decode_ (D = 200: wider than the SIMD form, the plain C++ one; F = 20: a partial vector of
    features) against ops' recurrence."""
    g = torch.Generator().manual_seed(7)
    H, KV, F = 4, 2, 20
    state = torch.rand(H, F, D + 1, generator=g)
    fq, fk, v = torch.rand(H, F, generator=g), torch.rand(KV, F, generator=g), torch.randn(KV, D, generator=g)
    a = torch.rand(H, generator=g) if decay else torch.empty(0)
    v1 = torch.cat([v, torch.ones(KV, 1)], -1).repeat_interleave(2, 0)
    fkr = fk.repeat_interleave(2, 0)
    # the reference: one step of ops' recurrence on [B=1, H, T=1, .], then the normaliser
    o, want_state = recurrent_linear_attn(fq[None, :, None], fkr[None, :, None], v1[None, :, None], 1.0,
                                          state[None].clone(), True, torch.log(a) if decay else None)
    want = normalise(o[0, :, 0], 1e-6)
    kv, z = state[..., :D].contiguous(), state[..., D].contiguous()  # the kernels' form: the normaliser apart
    got = ext.linear_decode_(kv, z, fq, fk, v, a, 1e-6)
    torch.testing.assert_close(torch.cat([kv, z[..., None]], -1), want_state[0])  # updated in place
    torch.testing.assert_close(got, want)


@needs_ext
def test_linear_steps_and_feature_maps_of_a_batch_equal_each_sequence_alone():
    """linear_segments_ with one row per state (a decoding step of several sequences) and hedgehog on several
    tokens' heads give, bit for bit, what one call per sequence gives; a state given twice is refused."""
    g = torch.Generator().manual_seed(9)
    B, H, KV, F, D, hd, Fh = 3, 4, 2, 12, 8, 16, 6
    states = [torch.rand(H, F, D, generator=g) for _ in range(B)]
    zs = [torch.rand(H, F, generator=g) for _ in range(B)]
    fq, fk, v = torch.rand(B, H, F, generator=g), torch.rand(B, KV, F, generator=g), torch.randn(B, KV, D, generator=g)
    a = torch.rand(H, generator=g)
    alone = [(s.clone(), z.clone()) for s, z in zip(states, zs)]
    want = torch.stack([ext.linear_decode_(s, z, fq[b].contiguous(), fk[b].contiguous(), v[b].contiguous(), a, 1e-6)
                        for b, (s, z) in enumerate(alone)])
    got = ext.linear_segments_(states, zs, list(range(B + 1)), fq, fk, v, a, 1e-6)
    assert torch.equal(got, want)
    assert all(torch.equal(s, t) and torch.equal(z, y) for s, z, (t, y) in zip(states, zs, alone))
    two = (fq[:2].contiguous(), fk[:2].contiguous(), v[:2].contiguous(), a, 1e-6)
    with pytest.raises(RuntimeError, match="rows 0 and 1 share a state"):
        ext.linear_segments_([states[0], states[0]], zs[:2], [0, 1, 2], *two)
    with pytest.raises(RuntimeError, match="rows 0 and 1 share a normaliser"):
        ext.linear_segments_(states[:2], [zs[0], zs[0]], [0, 1, 2], *two)
    with pytest.raises(RuntimeError, match="starts must"):
        ext.linear_segments_(states[:2], zs[:2], [0, 2, 1], *two)
    x, w = torch.randn(B * H, hd, generator=g), torch.randn(H, hd, Fh, generator=g)
    one_by_one = torch.cat([ext.hedgehog(x[b * H:(b + 1) * H].contiguous(), w) for b in range(B)])
    assert torch.equal(ext.hedgehog(x, w), one_by_one)
    # many rows (a prompt's) run in parallel: still each row as alone
    x = torch.randn(300 * H, hd, generator=g)
    assert torch.equal(ext.hedgehog(x, w), torch.cat([ext.hedgehog(x[r * H:(r + 1) * H].contiguous(), w)
                                                      for r in range(300)]))


@needs_ext
@pytest.mark.parametrize("D", [8, 64, 200])
def test_linear_prompt_segments_equal_decoding_them_token_by_token(D):
    """Prompt chunks of three sequences (lengths 5, 0 and 9, on states that already hold tokens) in one
    linear_segments_ call: every output row and the final states equal, bit for bit, decoding each sequence's
    tokens one at a time."""
    g = torch.Generator().manual_seed(11)
    H, KV, F = 4, 2, 12
    lengths = [5, 0, 9]
    R = sum(lengths)
    starts = [0, 5, 5, 14]
    states = [torch.rand(H, F, D, generator=g) for _ in lengths]
    zs = [torch.rand(H, F, generator=g) for _ in lengths]
    fq, fk, v = torch.rand(R, H, F, generator=g), torch.rand(R, KV, F, generator=g), torch.randn(R, KV, D, generator=g)
    a = torch.rand(H, generator=g)
    alone = [(s.clone(), z.clone()) for s, z in zip(states, zs)]
    want = torch.stack([ext.linear_decode_(*alone[b], fq[r].contiguous(), fk[r].contiguous(), v[r].contiguous(), a,
                                           1e-6) for b in range(3) for r in range(starts[b], starts[b + 1])])
    got = ext.linear_segments_(states, zs, starts, fq, fk, v, a, 1e-6)
    assert torch.equal(got, want)
    assert all(torch.equal(s, t) and torch.equal(z, y) for s, z, (t, y) in zip(states, zs, alone))


@needs_ext
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("D", [8, 64, 200])
def test_hybrid_decode_steps_equal_ops_hybrid_attention(decay, D):
    """Token by token through the fused hybrid step (a ring buffer that fills, then wraps twice) against ops'
    hybrid attention over the whole sequence, and its quadratic reference (D = 200: wider than the AVX-512 form,
    the plain C++ one; F = 20: a partial vector of features)."""
    g = torch.Generator().manual_seed(8)
    H, KV, F, w, T = 4, 2, 20, 5, 13
    q, k, v = torch.randn(T, H, D, generator=g), torch.randn(T, KV, D, generator=g), torch.randn(T, KV, D, generator=g)
    fq, fk = torch.rand(T, H, F, generator=g), torch.rand(T, KV, F, generator=g)
    a = torch.rand(H, generator=g) * 0.5 + 0.5 if decay else torch.empty(0)
    log_decay = torch.log(a) if decay else None
    kv, z, meta = torch.zeros(H, F, D), torch.zeros(H, F), torch.tensor([0, 0], dtype=torch.long)
    wk, wfk, wv1 = torch.zeros(H, w, D), torch.zeros(H, w, F), torch.zeros(H, w, D + 1)
    got = torch.stack([ext.hybrid_decode_(kv, z, wk, wfk, wv1, meta, q[t].contiguous(), k[t].contiguous(),
                                          v[t].contiguous(), fq[t].contiguous(), fk[t].contiguous(), a, D ** -0.5,
                                          1e-6) for t in range(T)], dim=1)  # [H, T, D]

    def heads(x, rep=1):  # [T, h, .] -> [1, h * rep, T, .]
        return x.transpose(0, 1).repeat_interleave(rep, 0)[None]

    v1 = torch.cat([v, torch.ones(T, KV, 1)], -1)
    want, want_state = hybrid_attn(heads(q), heads(k, 2), heads(fq), heads(fk, 2), heads(v1, 2), w, D ** -0.5,
                                   None, log_decay, None, chunk_size=4)
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([kv, z[..., None]], -1), want_state[0], atol=1e-5, rtol=1e-5)
    naive = naive_hybrid_attn(heads(q), heads(k, 2), heads(v, 2), heads(fq), heads(fk, 2), w, D ** -0.5, log_decay)
    torch.testing.assert_close(got, naive[0], atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("D", [8, 64, 200])
def test_hybrid_steps_of_a_batch_equal_each_sequence_alone(D):
    """hybrid_segments_ with one row per sequence (a decoding step): three sequences at different window fills
    (empty, part full, wrapped), each on its own state and ring, give bit for bit what one hybrid_decode_ call per
    sequence gives; a state or normaliser given twice is refused."""
    g = torch.Generator().manual_seed(10)
    B, H, KV, F, w = 3, 4, 2, 12, 5
    a = torch.rand(H, generator=g) * 0.5 + 0.5

    def seq(filled):
        meta = torch.tensor([min(filled, w), filled % w if filled >= w else 0], dtype=torch.long)
        return [torch.rand(H, F, D, generator=g), torch.rand(H, F, generator=g), torch.randn(H, w, D, generator=g),
                torch.rand(H, w, F, generator=g), torch.rand(H, w, D + 1, generator=g), meta]

    seqs = [seq(n) for n in (0, 3, 7)]
    alone = [[t.clone() for t in s] for s in seqs]
    q, fq = torch.randn(B, H, D, generator=g), torch.rand(B, H, F, generator=g)
    k, v, fk = torch.randn(B, KV, D, generator=g), torch.randn(B, KV, D, generator=g), torch.rand(B, KV, F, generator=g)
    want = torch.stack([ext.hybrid_decode_(*s, q[b].contiguous(), k[b].contiguous(), v[b].contiguous(),
                                           fq[b].contiguous(), fk[b].contiguous(), a, D ** -0.5, 1e-6)
                        for b, s in enumerate(alone)])
    got = ext.hybrid_segments_(*[[s[i] for s in seqs] for i in range(6)], list(range(B + 1)), q, k, v, fq, fk, a,
                               D ** -0.5, 1e-6)
    assert torch.equal(got, want)
    assert all(torch.equal(x, y) for s, t in zip(seqs, alone) for x, y in zip(s, t))  # states, rings and metas
    two = ([0, 1, 2], q[:2].contiguous(), k[:2].contiguous(), v[:2].contiguous(), fq[:2].contiguous(),
           fk[:2].contiguous(), a, D ** -0.5, 1e-6)
    with pytest.raises(RuntimeError, match="rows 0 and 1 share a state"):
        ext.hybrid_segments_(*[[seqs[0][i]] * 2 for i in range(6)], *two)
    with pytest.raises(RuntimeError, match="rows 0 and 1 share a normaliser"):
        ext.hybrid_segments_(*[[seqs[0][i], seqs[0][i] if i == 1 else seqs[1][i]] for i in range(6)], *two)



def test_without_a_compiler_the_runtime_falls_back_to_torch_kernels(tmp_path):
    """No C++ compiler: load() returns None with the reason, auto picks torch's kernels, cmx is refused clearly."""
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from codexmini.runtime import native\n"
        "from codexmini.runtime.kernels import resolve_mode\n"
        "assert native.load() is None and native.load_error(), native.load_error()\n"
        "assert resolve_mode('auto') == 'native'\n"
        "try:\n    resolve_mode('cmx')\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    env = {**__import__("os").environ, "CXX": "/bin/false", "CODEXMINI_KERNEL_CACHE": str(tmp_path / "k")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: kernels='cmx': codexmini's CPU kernels could not be built" in out.stdout


@needs_ext
@pytest.mark.parametrize("D", [8, 64, 200])
def test_hybrid_prompt_segments_equal_decoding_them_token_by_token(D):
    """Prompt chunks of three sequences in one hybrid_segments_ call (an empty window filling and wrapping past it
    twice, a part-full window, a wrapped one; 13, 2 and 6 tokens): every row, state, ring slot and ring meta equals,
    bit for bit, decoding each sequence's tokens one at a time."""
    g = torch.Generator().manual_seed(12)
    H, KV, F, w = 4, 2, 12, 5
    lengths = [13, 2, 6]
    starts = [0, 13, 15, 21]
    R = starts[-1]
    a = torch.rand(H, generator=g) * 0.5 + 0.5

    def seq(filled):
        meta = torch.tensor([min(filled, w), filled % w if filled >= w else 0], dtype=torch.long)
        return [torch.rand(H, F, D, generator=g), torch.rand(H, F, generator=g), torch.randn(H, w, D, generator=g),
                torch.rand(H, w, F, generator=g), torch.rand(H, w, D + 1, generator=g), meta]

    seqs = [seq(n) for n in (0, 3, 7)]
    alone = [[t.clone() for t in s] for s in seqs]
    q, fq = torch.randn(R, H, D, generator=g), torch.rand(R, H, F, generator=g)
    k, v, fk = torch.randn(R, KV, D, generator=g), torch.randn(R, KV, D, generator=g), torch.rand(R, KV, F, generator=g)
    want = torch.stack([ext.hybrid_decode_(*alone[b], q[r].contiguous(), k[r].contiguous(), v[r].contiguous(),
                                           fq[r].contiguous(), fk[r].contiguous(), a, D ** -0.5, 1e-6)
                        for b in range(3) for r in range(starts[b], starts[b + 1])])
    got = ext.hybrid_segments_(*[[s[i] for s in seqs] for i in range(6)], starts, q, k, v, fq, fk, a, D ** -0.5, 1e-6)
    assert torch.equal(got, want)
    assert all(torch.equal(x, y) for s, t in zip(seqs, alone) for x, y in zip(s, t))  # states, rings and metas


@needs_ext
@pytest.mark.parametrize("hd", [16, 64, 128])  # one head at a time; the grouped kernel
def test_float16_caches_attend_as_the_float32_values_they_hold(hd):
    """Float16 KV caches: the appended key and value are rounded to float16, and every output (one token, a batch,
    a prompt chunk) equals bit for bit the float32 kernel on caches holding the same values; a cache whose keys and
    values differ in dtype, or a batch mixing dtypes, is refused."""
    g = torch.Generator().manual_seed(13)
    H, KV, n, T = 6, 2, 70, 5
    kc, vc = torch.randn(KV, n + T + 1, hd, generator=g).half(), torch.randn(KV, n + T + 1, hd, generator=g).half()
    k32, v32 = kc.float(), vc.float()
    qkv = torch.randn(T, (H + 2 * KV) * hd, generator=g)
    want = ext.attend_prompt(qkv.clone(), k32, v32, n, H, KV, hd, hd ** -0.5, 0)
    rounded = qkv.clone()
    rounded[:, H * hd:] = rounded[:, H * hd:].half().float()  # what the float16 cache keeps of the new keys / values
    want16 = ext.attend_prompt(rounded, k32.clone(), v32.clone(), n, H, KV, hd, hd ** -0.5, 0)
    got = ext.attend_prompt(qkv, kc, vc, n, H, KV, hd, hd ** -0.5, 0)
    assert kc.dtype == torch.float16 and torch.equal(got, want16)
    assert torch.equal(kc[:, n:n + T].float(), rounded[:, H * hd:(H + KV) * hd].reshape(T, KV, hd).transpose(0, 1))
    torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)  # float16 rounding of the new tokens only
    # a batch: each row as alone, on float16 caches
    caches = [(torch.randn(KV, m + 2, hd, generator=g).half(), torch.randn(KV, m + 2, hd, generator=g).half())
              for m in (3, 40)]
    rows = torch.randn(2, (H + 2 * KV) * hd, generator=g)
    alone = torch.cat([ext.attend_decode(rows[b:b + 1].clone(), k.clone(), v.clone(), m, H, KV, hd, 0.1, 0)
                       for b, ((k, v), m) in enumerate(zip(caches, (3, 40)))])
    got = ext.attend_decode_batch(rows, [k for k, _ in caches], [v for _, v in caches], [3, 40], H, KV, hd, 0.1, 0)
    assert torch.equal(got, alone)
    with pytest.raises(RuntimeError, match="keys and values alike"):
        ext.attend_decode(rows[:1].clone(), kc, vc.float(), 0, H, KV, hd, 0.1, 0)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.attend_decode_batch(rows, [caches[0][0], k32], [caches[0][1], v32], [3, 40], H, KV, hd, 0.1, 0)
