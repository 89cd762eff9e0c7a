import pytest
import torch

from codexmini.models.ops import chunk_linear_attn, naive_linear_attn, recurrent_linear_attn

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
def test_chunk_gradients_match_naive(decay):
    q, k, v, s0 = _inputs(29, requires_grad=True)
    ld = torch.log(torch.tensor([0.9, 0.5, 0.99])).requires_grad_(True) if decay else None
    grads = []
    for fn in (naive_linear_attn, KERNELS["chunk"]):
        o, s = fn(q, k, v, None, s0, True, ld)
        loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + s.square().sum()
        params = [q, k, v, s0] + ([ld] if decay else [])
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
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
