"""Chunked and recurrent linear attention against the quadratic reference: outputs, states and gradients."""

import pytest
import torch

from codexmini.ops.linear_attn import (NORMALISER_EPS, append_ones, chunk_linear_attn, linear_attn,
                                       naive_linear_attn, normalise, recurrent_linear_attn)

KERNELS = {"chunk": lambda *a, **k: chunk_linear_attn(*a, chunk_size=8, **k),
           "recurrent": recurrent_linear_attn}


def _inputs(T=37, requires_grad=False):
    B, H, K, V = 2, 3, 8, 5
    q, k = torch.rand(B, H, T, K), torch.rand(B, H, T, K)
    v, s0 = torch.randn(B, H, T, V), torch.randn(B, H, K, V)
    for t in (q, k, v, s0):
        t.requires_grad_(requires_grad)
    return q, k, v, s0


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 8, 37])
def test_kernels_match_naive_outputs_and_state(kernel, decay, with_state, T):
    q, k, v, s0 = _inputs(T)
    ld = torch.log(torch.tensor([0.9, 0.5, 0.99])) if decay else None
    s0 = s0 if with_state else None
    ref, ref_state = naive_linear_attn(q, k, v, 0.5, s0, True, ld)
    out, state = KERNELS[kernel](q, k, v, 0.5, s0, True, ld)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decay", [False, True])
def test_chunk_and_recurrent_gradients_match_naive(decay):
    q, k, v, s0 = _inputs(29, requires_grad=True)
    ld = torch.log(torch.tensor([0.9, 0.5, 0.99])).requires_grad_(True) if decay else None
    grads = []
    for fn in (naive_linear_attn, KERNELS["chunk"], KERNELS["recurrent"]):
        o, s = fn(q, k, v, None, s0, True, ld)
        loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + s.square().sum()
        params = [q, k, v, s0] + ([ld] if decay else [])
        grads.append(torch.autograd.grad(loss, params))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_split_sequence_with_carried_state_equals_whole():
    q, k, v, _ = _inputs(40)
    ld = torch.log(torch.tensor([0.8, 0.95, 0.99]))
    whole, s_whole = chunk_linear_attn(q, k, v, None, None, True, ld, chunk_size=16)
    a, s = chunk_linear_attn(q[:, :, :23], k[:, :, :23], v[:, :, :23], None, None, True, ld, chunk_size=16)
    b, s2 = chunk_linear_attn(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], None, s, True, ld, chunk_size=16)
    torch.testing.assert_close(torch.cat([a, b], 2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s_whole, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused():
    q, k, v, _ = _inputs(8)
    with pytest.raises(ValueError, match="expects q, k"):
        chunk_linear_attn(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="log_decay"):
        recurrent_linear_attn(q, k, v, log_decay=torch.zeros(7))


@pytest.mark.parametrize("decay", [False, True])
def test_chunk_without_final_state_gives_the_same_output(decay):
    q, k, v, s0 = _inputs(37)
    ld = torch.log(torch.tensor([0.9, 0.5, 0.99])) if decay else None
    full, _ = chunk_linear_attn(q, k, v, None, s0, True, ld, chunk_size=8)
    out, state = chunk_linear_attn(q, k, v, None, s0, False, ld, chunk_size=8)
    assert state is None
    torch.testing.assert_close(out, full, atol=0, rtol=0)


def test_chunk_keeps_the_input_dtype_and_a_float32_state():
    q, k, v, s0 = _inputs(20)
    out, state = chunk_linear_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, True, chunk_size=8)
    ref, ref_state = naive_linear_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)


def test_linear_attn_picks_the_recurrence_for_one_token_and_chunks_otherwise(monkeypatch):
    import codexmini.ops.linear_attn as la

    calls = []
    monkeypatch.setattr(la, "recurrent_linear_attn", lambda *a, **k: calls.append("recurrent") or (None, None))
    monkeypatch.setattr(la, "chunk_linear_attn", lambda *a, **k: calls.append(("chunk", k["chunk_size"]))
                        or (None, None))
    q, k, v, _ = _inputs(5)
    la.linear_attn(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    la.linear_attn(q, k, v, chunk_size=4)
    assert calls == ["recurrent", ("chunk", 4)]


def test_ones_column_turns_the_last_output_into_the_normaliser():
    """`normalise(linear_attn(phi q, phi k, [v, 1]))` is causal attention with weights phi(q_i).phi(k_j)."""
    q, k, v, _ = _inputs(11)
    o, _ = linear_attn(q, k, append_ones(v), chunk_size=4)
    got = normalise(o)
    w = (q @ k.transpose(-1, -2)).tril()
    want = (w @ v) / (w.sum(-1, keepdim=True) + NORMALISER_EPS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert append_ones(v).shape[-1] == v.shape[-1] + 1 and bool((append_ones(v)[..., -1] == 1).all())
    # an all-zero normaliser (relu features that are all zero) stays finite
    assert torch.isfinite(normalise(torch.zeros(1, 1, 2, 4))).all()
