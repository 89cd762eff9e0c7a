"""codexmini's group-quantized kernels (runtime/csrc/cmx_kernels.cpp: q4_linear, q3_linear, q2_linear and their _cat
forms) against the portable layout's reference, `codexmini.ops.layouts.dequantize`: fp32 and fp16 scales, symmetric
(an empty zero tensor: the implied middle code), asymmetric and `_min` weights (float16 mins in the zero's place), decoding (up to `gemv_rows()` rows: the SIMD GEMV, or
plain C++ for group sizes it does not take) and prompts (the tiled GEMM), fp32 and int8 activations."""

import pytest
import torch

from codexmini.ops.layouts import dequantize, mode_of, pack_bits, quantize_group, unpack_bits
from codexmini.runtime import native
from tests.runtime.test_cmx_kernels import BF16_TOL, GEMV_ROWS, fast_prompt_product, int8_activations

ext = native.load()
pytestmark = pytest.mark.skipif(ext is None, reason=f"codexmini kernels not built: {native.load_error()}")
EMPTY = torch.empty(0, dtype=torch.uint8)  # a symmetric weight's zero tensor


def _linear(bits):
    return getattr(ext, f"q{bits}_linear"), getattr(ext, f"q{bits}_linear_cat")


def _layer(bits, N, K, G, sym=True, half=True, seed=0):
    """Random codes over the whole range (code 0 included) with signed scales, as the kernels' (qweight, scale, zero),
    and ops' dequantized weight [N, K]. `sym`: True / "sym", False / "asym" (random zero points) or "min" (random
    float16 mins, passed in the zero's place)."""
    kind = mode_of(sym)
    g = torch.Generator().manual_seed(seed)
    qweight = pack_bits(torch.randint(0, 1 << bits, (N, K), generator=g), bits)
    scale = torch.randn(N, K // G, generator=g) * 0.05
    scale = scale.half() if half else scale
    if kind == "min":
        mins = (torch.randn(N, K // G, generator=g) * 0.1).half()
        return (qweight, scale, mins), dequantize(f"int{bits}_g{G}_min", qweight, scale, min_=mins)
    zero = EMPTY if kind == "sym" else torch.randint(0, 1 << bits, (N, K // G), dtype=torch.uint8, generator=g)
    scheme = f"int{bits}_g{G}" + ("" if kind == "sym" else "_asym")
    return (qweight, scale, zero), dequantize(scheme, qweight, scale, None if kind == "sym" else zero)


def _reference(x, W, int8_act):
    """x W^T as the kernels compute it: int8 activations for up to GEMV_ROWS rows (where K is a multiple of 32), bf16
    prompts where the CPU multiplies bf16 natively, else exact fp32."""
    if int8_act and x.shape[0] > GEMV_ROWS:
        return fast_prompt_product(x, W)
    if int8_act and x.shape[1] % 32 == 0:
        return int8_activations(x) @ W.t()
    return x @ W.t()


def _tol(want, M, int8_act):
    # bf16 prompts: the product's rounding to bf16, taken by the reference and the GEMM at sums that differ in their
    # last fp32 bits, can land two bf16 steps apart
    rtol = 2 * BF16_TOL["rtol"] if int8_act and M > GEMV_ROWS else 1e-5
    return dict(atol=2e-5 * want.abs().max().item(), rtol=rtol)


# (N, K, G): odd N, several groups, chunk tails (K = 576, 192), K < one SIMD chunk, a group of 8 (int3 / int2:
# plain C++), K not a multiple of the int8 activations' 32-column blocks (48: those fall back to fp32)
SHAPES = [(37, 64, 8), (50, 128, 16), (33, 576, 32), (70, 192, 64), (24, 256, 128), (19, 48, 16)]


def _check(linear, args, W, M, K, N, seed=1):
    """fp32 activations (with and without a residual) equal x W^T; the fast ones equal their reference."""
    gen = torch.Generator().manual_seed(seed)
    x, r = torch.randn(M, K, generator=gen), torch.randn(M, N, generator=gen)
    want = x @ W.t()
    torch.testing.assert_close(linear(x, *args), want, **_tol(want, M, False), msg=lambda m: f"M={M}: {m}")
    torch.testing.assert_close(linear(x, *args, r), want + r, **_tol(want, M, False), msg=lambda m: f"M={M}: {m}")
    got = linear(x, *args, r, True)
    torch.testing.assert_close(got, _reference(x, W, True) + r, **_tol(want, M, True), msg=lambda m: f"M={M}: {m}")
    if (M <= GEMV_ROWS and K % 32 == 0) or (M > GEMV_ROWS and ext.bf16_prompts()):  # the fast path is not silently the fp32 one
        assert (got - want - r).abs().max() > 1e-4 * want.abs().max(), f"M={M}"


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("N, K, G", SHAPES)
@pytest.mark.parametrize("half", [True, False], ids=["fp16_scale", "fp32_scale"])
@pytest.mark.parametrize("sym", ["sym", "asym", "min"])
def test_decoding_equals_the_dequantized_reference(bits, N, K, G, half, sym):
    """One to GEMV_ROWS rows: the GEMV (every weight row read once for all of them, eight rows a pass: every row
    count of one pass, then several passes)."""
    args, W = _layer(bits, N, K, G, sym, half)
    for M in [*range(1, 9), 9, 17, GEMV_ROWS]:
        _check(_linear(bits)[0], args, W, M, K, N)


# prompts: group sizes the SIMD dequantization takes and one it does not, a second tile of rows (N > 256); few
# shapes, shared by the bit widths (each new GEMM shape costs the BLAS a setup)
PROMPT_SHAPES = [(300, 64, 8), (33, 576, 32), (19, 48, 16)]


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("N, K, G", PROMPT_SHAPES)
def test_prompt_equals_the_dequantized_reference(bits, N, K, G):
    """A prompt (more than GEMV_ROWS rows): tiles of dequantized rows through the GEMM."""
    for half, sym in ((True, "sym"), (False, "asym"), (True, "min")):
        args, W = _layer(bits, N, K, G, sym, half)
        _check(_linear(bits)[0], args, W, 64, K, N)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("sym", ["sym", "asym", "min"])
@pytest.mark.parametrize("M", [1, 8])
def test_quantized_weights_equal_the_reference(bits, sym, M):
    """Weights as `quantize_group` makes them (fp16 scales; symmetric: the group's extreme on code 0 with a signed,
    often negative, scale; min: each group's least weight on code 0) through both activation paths."""
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(96, 320, generator=gen), torch.randn(M, 320, generator=gen)
    q = quantize_group(w, bits, 32, sym)
    assert q.scale.dtype == torch.float16 and (q.scale < 0).any() == (sym == "sym")
    assert (unpack_bits(q.packed, bits) == 0).any()  # (symmetric: every group's extreme sits on code 0)
    zero = {"sym": EMPTY, "asym": q.zero, "min": q.min}[sym]
    W = dequantize(f"int{bits}_g32" + {"sym": "", "asym": "_asym", "min": "_min"}[sym], q.packed, q.scale,
                   q.zero if sym == "asym" else None, q.min)
    linear, _ = _linear(bits)
    for int8_act in (False, True):
        want = _reference(x, W, int8_act)
        torch.testing.assert_close(linear(x, q.packed, q.scale, zero, None, int8_act), want, **_tol(want, M, False))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_symmetric_weight_with_its_zero_stored_equals_the_empty_zero(bits):
    """Older files store the symmetric zero point (the middle code) as a tensor: the same weight either way."""
    (qweight, scale, _), W = _layer(bits, 40, 128, 32)
    full = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.uint8)
    linear, _ = _linear(bits)
    x = torch.randn(2, 128)
    for int8_act in (False, True):
        torch.testing.assert_close(linear(x, qweight, scale, full, None, int8_act),
                                   linear(x, qweight, scale, EMPTY, None, int8_act), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("M", [1, 3, 8, 9, GEMV_ROWS + 1])
@pytest.mark.parametrize("int8_act", [False, True])
def test_parts_side_by_side_and_fused_silu_equal_the_reference(bits, M, int8_act):
    """q/k/v (heights over and under a tile of 256 rows, symmetric, asymmetric and min parts, fp16 and fp32 scales)
    side by side, and gate/up fused into silu(gate) * up, against the dequantized parts concatenated."""
    K = 192
    layers = [_layer(bits, 300, K, 32, sym=True, half=True, seed=3), _layer(bits, 40, K, 32, sym=False, seed=4),
              _layer(bits, 24, K, 64, sym=True, half=False, seed=5), _layer(bits, 20, K, 32, sym="min", seed=8)]
    _, cat = _linear(bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(6))
    parts = [list(t) for t in zip(*(args for args, _ in layers))]
    want = _reference(x, torch.cat([W for _, W in layers]), int8_act)
    torch.testing.assert_close(cat(x, *parts, int8_act), want, **_tol(want, M, int8_act))
    (qg, sg, zg), Wg = layers[0]
    (qu, su, zu), Wu = _layer(bits, 300, K, 32, sym="min" if M % 2 else False, half=True, seed=7)
    want = torch.nn.functional.silu(_reference(x, Wg, int8_act)) * _reference(x, Wu, int8_act)
    got = cat(x, [qg, qu], [sg, su], [zg, zu], int8_act, True)
    torch.testing.assert_close(got, want, **_tol(want, M, int8_act))


def test_bad_low_bit_inputs_are_refused_with_the_reason():
    (q, s, _), _ = _layer(3, 16, 64, 16)
    with pytest.raises(RuntimeError, match="int3 qweight rows hold a multiple of 3 bytes"):
        ext.q3_linear(torch.randn(1, 64), q[:, :-1].contiguous(), s, EMPTY)
    with pytest.raises(RuntimeError, match="int3 scale must be a contiguous float32 or float16"):
        ext.q3_linear(torch.randn(1, 64), q, s.double(), EMPTY)
    with pytest.raises(RuntimeError, match="int3 zero must be"):
        ext.q3_linear(torch.randn(1, 64), q, s, torch.zeros(16, 1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="int3 zero must be .* a float16 one"):
        ext.q3_linear(torch.randn(1, 64), q, s, torch.zeros(s.shape, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="int3 group size 12 must divide K=48 and be a multiple of 8"):
        ext.q3_linear(torch.randn(1, 48), q[:, :18].contiguous(), s[:, :4].contiguous(), EMPTY)
    with pytest.raises(RuntimeError, match="input has 32 columns, the weight expects 64"):
        ext.q2_linear(torch.randn(1, 32), *_layer(2, 16, 64, 16)[0])
    with pytest.raises(RuntimeError, match="silu takes two weights"):
        ext.q3_linear_cat(torch.randn(1, 64), [q, q[:8].contiguous()], [s, s[:8].contiguous()], [EMPTY, EMPTY],
                          False, True)


def test_block_names_the_simd_group_sizes():
    for bits in (4, 3, 2):
        b = ext.block(bits)
        assert b in (2, 8, 16) and (b >= 8 or ext.isa() == "generic")
    assert ext.block() == ext.block(4)
