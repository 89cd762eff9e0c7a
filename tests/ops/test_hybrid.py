"""Hybrid window attention: the blocked form, continued over carried windows, and the model's layer, against the
quadratic masked reference."""

import pytest
import torch

from codexmini.ops.hybrid import hybrid_attn, naive_hybrid_attn, older_keys, window_softmax
from codexmini.ops.linear_attn import append_ones
from codexmini.ops.rope import rotary_cos_sin
from tests.conftest import perturb_linear_parts, tiny_config

B, H, D, F = 2, 4, 8, 12


def _inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    fq, fk = torch.rand(B, H, T, F, generator=g), torch.rand(B, H, T, F, generator=g)
    return q, k, v, fq, fk


LOG_DECAY = torch.log(torch.tensor([0.7, 0.9, 0.97, 0.999]))


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("T, window", [(1, 4), (5, 8), (23, 8), (23, 5), (16, 16)])
def test_hybrid_attn_equals_the_naive_reference(decay, T, window):
    q, k, v, fq, fk = _inputs(T)
    ld = LOG_DECAY if decay else None
    want = naive_hybrid_attn(q, k, v, fq, fk, window, D ** -0.5, ld)
    got, state = hybrid_attn(q, k, fq, fk, append_ones(v), window, D ** -0.5, None, ld, chunk_size=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state.shape == (B, H, F, D + 1)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("pieces", [(11, 1, 1, 1, 9, 1), (3, 3, 3, 3, 3, 3, 3, 2), (1,) * 23])
def test_hybrid_attn_continues_a_carried_window_and_state(decay, pieces):
    """Prefill in pieces or token by token, the caller keeping the last `window` keys and the state, equals the
    whole sequence at once."""
    window, T = 6, sum(pieces)
    q, k, v, fq, fk = _inputs(T, seed=1)
    ld = LOG_DECAY if decay else None
    v1 = append_ones(v)
    want = naive_hybrid_attn(q, k, v, fq, fk, window, D ** -0.5, ld)
    outs, win, state, s = [], None, None, 0
    for n in pieces:
        new = tuple(x[:, :, s:s + n] for x in (k, fk, v1))
        k_all, fk_all, v1_all = new if win is None else (torch.cat([a, b], 2) for a, b in zip(win, new))
        o, state = hybrid_attn(q[:, :, s:s + n], k_all, fq[:, :, s:s + n], fk_all, v1_all, window, D ** -0.5,
                               state, ld, chunk_size=4)
        outs.append(o)
        win = tuple(x[:, :, -window:] for x in (k_all, fk_all, v1_all))
        s += n
    torch.testing.assert_close(torch.cat(outs, 2), want, atol=1e-5, rtol=1e-5)


def test_older_keys_aligns_each_query_with_the_key_leaving_its_window():
    window, carried, T = 3, 2, 5
    x = torch.arange(1, carried + T + 1).float()[None, :, None]  # combined keys 1..7, [1, wc + T, 1]
    got = older_keys(x, T, window)[0, :, 0]
    # query i (combined index wc + i) linearly sees key wc + i - window, i.e. value wc + i - window + 1 (0: none)
    want = torch.tensor([max(carried + i - window + 1, 0) for i in range(T)]).float()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("T, carried, window, block", [(1, 5, 5, 64), (9, 0, 5, 64), (9, 3, 5, 64), (17, 5, 5, 64),
                                                     (3, 0, 8, 64), (4, 7, 8, 64), (30, 8, 8, 3), (30, 2, 12, 4)])
def test_window_softmax_equals_a_direct_masked_softmax_and_skips_padding(T, carried, window, block):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, T, D, generator=g)
    k_all, v_all = torch.randn(B, H, carried + T, D, generator=g), torch.randn(B, H, carried + T, D, generator=g)
    valid = torch.rand(B, carried + T, generator=g) > 0.3
    valid[:, -1] = True
    num, den = window_softmax(q, k_all, v_all, window, 0.3, valid, block)
    i = torch.arange(T)[:, None] + carried
    j = torch.arange(carried + T)[None, :]
    allowed = (j <= i) & (j > i - window) & valid[:, None, None, :]
    s = ((q @ k_all.transpose(-1, -2)) * 0.3).masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = torch.exp(s - m)
    torch.testing.assert_close(num, a @ v_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(den, a.sum(-1, keepdim=True), atol=1e-5, rtol=1e-5)
    # a padded key never counts: changing it changes nothing
    k2 = k_all.clone()
    k2[~valid[:, None, :, None].expand_as(k2)] = 100.0
    torch.testing.assert_close(window_softmax(q, k2, v_all, window, 0.3, valid, block)[0], num)


@pytest.mark.parametrize("feature_map, decay", [("elu", False), ("hedgehog", True), ("taylor", True),
                                                ("relu", False)])
def test_model_hybrid_layer_equals_the_naive_reference(feature_map, decay):
    """The model's HybridAttention (whole sequence, and prefill + token-by-token decoding through its cache)
    against `naive_hybrid_attn` on the layer's own projections and feature maps."""
    from codexmini.models.attention import HybridAttention, repeat_kv
    from codexmini.models.cache import CodexMiniCache

    torch.manual_seed(0)
    cfg = tiny_config(layer_types=["hybrid", "softmax"], feature_map=feature_map, linear_decay=decay,
                      sliding_window=8, linear_chunk_size=8)
    layer = perturb_linear_parts(HybridAttention(cfg, 0).eval())
    T = 29
    x = torch.randn(2, T, cfg.hidden_size)
    cos, sin = rotary_cos_sin(torch.arange(T)[None].expand(2, T), cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        q, k, v = layer.project(x, cos, sin)
        fq, fk = layer.feature_map_q(q), repeat_kv(layer.feature_map_k(k), layer.groups)
        o = naive_hybrid_attn(q, repeat_kv(k, layer.groups), repeat_kv(v, layer.groups), fq, fk,
                              cfg.sliding_window, cfg.head_dim ** -0.5, layer.log_decay())
        want = layer.output(o.to(x.dtype))
        torch.testing.assert_close(layer(x, cos, sin), want, atol=1e-5, rtol=1e-4)
        cache = CodexMiniCache(cfg.num_hidden_layers)
        steps = [layer(x[:, :11], cos[:, :11], sin[:, :11], cache=cache)]
        steps += [layer(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], cache=cache) for t in range(11, T)]
        torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_ops_run_on_a_gpu_with_the_cpu_results():
    """Nothing in ops is tied to the CPU: index tables, masks and padding follow the inputs' device."""
    from codexmini.ops.feature_maps import taylor_feature_map

    q, k, v, fq, fk = _inputs(23, seed=3)
    fq, fk = taylor_feature_map(fq), taylor_feature_map(fk)
    valid = torch.ones(B, 23, dtype=torch.bool)
    valid[0, :4] = False
    want, state = hybrid_attn(q, k, fq, fk, append_ones(v), 6, D ** -0.5, None, LOG_DECAY, valid, chunk_size=4)
    got, gstate = hybrid_attn(*(x.cuda() for x in (q, k, fq, fk, append_ones(v))), 6, D ** -0.5, None,
                              LOG_DECAY.cuda(), valid.cuda(), chunk_size=4)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gstate.cpu(), state, atol=1e-4, rtol=1e-4)
