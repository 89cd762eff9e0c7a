import math

import pytest
import torch
import torch.nn.functional as F

from codexmini.distill.losses import LOSSES, align_vocab, chunked_kd_loss, divergence


def _ref(s, t, kind, T, beta=0.5, alpha=0.1):
    """Direct probability-space formulas, one token at a time."""
    q, p = F.softmax(s / T, -1).double(), F.softmax(t / T, -1).double()
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
    if kind == "forward_kl":
        d = kl(p, q)
    elif kind == "reverse_kl":
        d = kl(q, p)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif kind == "skew_kl":
        d = kl(p, alpha * p + (1 - alpha) * q)
    else:
        d = kl(q, alpha * q + (1 - alpha) * p)
    return (d * T * T).float()


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_match_direct_formulas_and_vanish_on_equal_inputs(kind, temperature):
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    torch.testing.assert_close(divergence(s, t, kind, temperature, beta=0.3, alpha=0.2),
                               _ref(s, t, kind, temperature, beta=0.3, alpha=0.2), atol=1e-5, rtol=1e-4)
    assert divergence(t, t, kind, temperature).abs().max() < 1e-5


def test_forward_kl_is_the_classic_hinton_loss():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(divergence(s, t, "forward_kl", 2.0), ref * 4)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_chunked_loss_equals_unchunked_values_and_gradients(kind):
    V, H = 13, 6
    head_s, head_t = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    hs = torch.randn(2, 9, H, requires_grad=True)
    ht = torch.randn(2, 9, H)
    labels = torch.randint(0, V, (2, 9))
    labels[0, 4] = -100
    results = []
    for chunk in (1000, 3):
        out = chunked_kd_loss(hs, head_s, ht, head_t, labels, kind=kind, kd_ratio=0.7, chunk_size=chunk)
        grad, = torch.autograd.grad(out["loss"], hs)
        results.append((out["loss"].detach(), out["kd"], out["ce"], grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # And the parts are what they say: CE is ordinary next-token cross-entropy over unmasked positions.
    ce = F.cross_entropy(head_s(hs[:, :-1]).reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(results[0][2], ce.detach())


def test_padded_teacher_vocab_is_sliced_and_smaller_refused():
    t = torch.randn(2, 12)
    assert align_vocab(t, 10).shape[-1] == 10
    with pytest.raises(ValueError, match="must share a tokenizer"):
        align_vocab(t, 14)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="distill.loss"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), "mse")
    with pytest.raises(ValueError, match="temperature"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), "forward_kl", 0.0)
    with pytest.raises(ValueError, match="kd_ratio"):
        chunked_kd_loss(torch.zeros(1, 3, 2), lambda x: x, torch.zeros(1, 3, 2), lambda x: x,
                        torch.zeros(1, 3, dtype=torch.long), kd_ratio=1.5)
    assert math.isclose(float(divergence(torch.zeros(1, 4), torch.zeros(1, 4))), 0.0, abs_tol=1e-7)


@pytest.mark.parametrize("kd_ratio", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_linear_path_equals_autograd_reference(kd_ratio, temperature):
    V, H = 17, 8
    head_s = torch.nn.Linear(H, V, bias=False)
    head_t = torch.nn.Linear(H + 2, V + 3, bias=False)  # wider and padded vocabulary
    hs = torch.randn(3, 11, H, requires_grad=True)
    ht = torch.randn(3, 11, H + 2)
    labels = torch.randint(0, V, (3, 11))
    labels[1, 3:6] = -100
    results = []
    for fused in (False, True):
        head_s.zero_grad()
        out = chunked_kd_loss(hs, head_s, ht, head_t, labels, kind="forward_kl", temperature=temperature,
                              kd_ratio=kd_ratio, chunk_size=4, fused=fused)
        (out["loss"] * 1.7).backward()
        results.append((out["loss"].detach(), out["kd"], out["ce"], hs.grad.clone(), head_s.weight.grad.clone()))
        hs.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
