"""codexmini's own CPU kernels (runtime/csrc/cmx_kernels.cpp) against the dequantized reference."""

import pytest
import torch

from codexmini.export.to_cmx import export_cmx
from codexmini.quantize import QuantizeConfig, quantize_model
from codexmini.runtime import Runtime, native
from codexmini.runtime.kernels import dequantize, make_linear, resolve_mode
from tests.runtime.test_runtime import _model

ext = native.load()
needs_ext = pytest.mark.skipif(ext is None, reason=f"codexmini kernels not built: {native.load_error()}")


def _int4(N, K, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"w.qweight": torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
         "w.scale": torch.rand(N, K // G, generator=g) * 0.1,
         "w.zero": torch.randint(0, 16, (N, K // G), dtype=torch.uint8, generator=g)}
    return t, dequantize(t, "w", "int4")


@needs_ext
@pytest.mark.parametrize("N, K, G", [(96, 64, 32), (37, 128, 64), (200, 576, 32), (64, 256, 128)])
@pytest.mark.parametrize("M", [1, 3, 9])  # one row and few rows take the GEMV, more the tiled GEMM
def test_int4_kernel_equals_dequantized_reference(N, K, G, M):
    t, W = _int4(N, K, G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    want = x @ W.t()
    got = ext.q4_linear(x, t["w.qweight"], t["w.scale"], t["w.zero"])
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    r = torch.randn(M, N)
    torch.testing.assert_close(ext.q4_linear(x, t["w.qweight"], t["w.scale"], t["w.zero"], r), want + r,
                               atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("N, K", [(33, 40), (300, 64), (1000, 576)])
@pytest.mark.parametrize("M", [1, 9])
def test_int8_kernel_equals_dequantized_reference(N, K, M):
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01
    x = torch.randn(M, K, generator=g)
    want = x @ (q.float() * s[:, None]).t()
    torch.testing.assert_close(ext.q8_linear(x, q, s), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    r = torch.randn(M, N)
    torch.testing.assert_close(ext.q8_linear(x, q, s, r), want + r, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@needs_ext
def test_bad_kernel_inputs_are_refused_with_the_reason():
    t, _ = _int4(64, 128, 32)
    with pytest.raises(RuntimeError, match="input has 64 columns, the weight expects 128"):
        ext.q4_linear(torch.randn(1, 64), t["w.qweight"], t["w.scale"], t["w.zero"])
    with pytest.raises(RuntimeError, match="zero must be"):
        ext.q4_linear(torch.randn(1, 128), t["w.qweight"], t["w.scale"], t["w.zero"][:, :1].contiguous())
    with pytest.raises(RuntimeError, match="float32"):
        ext.q8_linear(torch.randn(1, 8).double(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))


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
    ids = torch.randint(4, 300, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits[0]
    rt = Runtime(path, kernels="cmx")
    assert rt.kernels == "cmx"
    s = rt.new_session()
    # 20-token prefill (tiled GEMM), a 3-token step (few-row GEMV), then token by token (one-row GEMV)
    got = [rt.forward(ids[0, :20], s, all_logits=True), rt.forward(ids[0, 20:23], s, all_logits=True)]
    got += [rt.forward(ids[0, t:t + 1], s, all_logits=True) for t in range(23, 30)]
    torch.testing.assert_close(torch.cat(got), want, atol=5e-4, rtol=1e-3)


def test_kernel_mode_names_are_checked():
    with pytest.raises(ValueError, match="runtime kernel mode 'fast'"):
        resolve_mode("fast")
    assert resolve_mode("auto") == ("cmx" if ext is not None else "native")
