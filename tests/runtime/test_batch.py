"""The runtime's fast paths for serving against their slow references: a batched decode step equals each session
decoded alone; a session forked from a checkpoint (or cut back) equals recomputing its tokens from scratch."""

from __future__ import annotations

import pytest
import torch

from codexmini.export.to_cmx import export_cmx
from codexmini.quantize import QuantizeConfig, quantize_model
from codexmini.runtime import Runtime
from codexmini.runtime.model import decode_rows
from tests.runtime.test_runtime import VARIANTS, _model


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 300, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _decode_pair(rt, prompts, steps):
    """Greedy decoding of every prompt: batched (one `decode_batch` per step) and one session at a time."""
    batched, alone = [rt.new_session() for _ in prompts], [rt.new_session() for _ in prompts]
    lb = torch.stack([rt.forward(p, s) for p, s in zip(prompts, batched)])
    la = torch.stack([rt.forward(p, s) for p, s in zip(prompts, alone)])
    tokens_b, tokens_a, worst = [], [], 0.0
    for _ in range(steps):
        ids_b, ids_a = lb.argmax(-1).tolist(), la.argmax(-1).tolist()
        tokens_b.append(ids_b)
        tokens_a.append(ids_a)
        lb = rt.decode_batch(ids_b, batched)
        la = torch.stack([rt.forward([t], s) for t, s in zip(ids_a, alone)])
        worst = max(worst, (lb - la).abs().max().item())
    return tokens_b, tokens_a, worst, batched, alone


def _int_runtime(tiny_tokenizer, tmp_path) -> Runtime:
    """A softmax / hybrid / linear model with every linear layer and the head in int kernels (int4 g32, int8 head)."""
    model = _model(layer_types=["softmax", "hybrid", "linear"], num_hidden_layers=3, feature_map="hedgehog",
                   linear_decay=True, tie_word_embeddings=False)
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32",
                                                    rules=[{"pattern": "lm_head", "scheme": "int8"}]))
    rt = Runtime(export_cmx(model, tiny_tokenizer, tmp_path / "q.cmx"))
    if rt.kernels != "cmx":
        pytest.skip("codexmini's kernels did not build here")
    return rt


@pytest.mark.parametrize("kernels", ["auto", "native"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_decode_equals_decoding_alone(variant, kernels, tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(**VARIANTS[variant]), tiny_tokenizer, tmp_path / "m.cmx"), kernels=kernels)
    prompts = _prompts(2 * decode_rows() + 1)  # the int kernels' row limit crossed
    tokens_b, tokens_a, worst, batched, alone = _decode_pair(rt, prompts, 24)  # past the hybrid window
    assert tokens_b == tokens_a
    assert worst < 1e-4
    assert [s.pos for s in batched] == [s.pos for s in alone] and [s.tokens for s in batched] == \
        [s.tokens for s in alone]


def test_batched_decode_of_an_int_model_is_exact(tiny_tokenizer, tmp_path):
    """Every linear layer and the head in int kernels: each row of a batch is computed exactly as alone."""
    rt = _int_runtime(tiny_tokenizer, tmp_path)
    tokens_b, tokens_a, worst, _, _ = _decode_pair(rt, _prompts(2 * decode_rows() + 2, seed=5), 12)
    assert tokens_b == tokens_a and worst == 0.0


def test_sessions_join_and_leave_between_steps(tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(**VARIANTS["mixed_taylor"]), tiny_tokenizer, tmp_path / "m.cmx"))
    a, b, c = rt.new_session(), rt.new_session(), rt.new_session()
    ref_a, ref_c = rt.new_session(), rt.new_session()
    for s in (a, ref_a):
        rt.forward([5, 6, 7], s)
    for s in (c, ref_c):
        rt.forward([9, 10], s)
    rt.forward([11, 12, 13, 14], b)
    rt.decode_batch([20, 21], [a, b])
    rt.decode_batch([22, 23, 24], [a, b, c])  # c joins
    got = rt.decode_batch([25, 26], [c, a])  # b leaves, the order changes
    want_a = [rt.forward([t], ref_a) for t in (20, 22, 26)][-1]
    want_c = [rt.forward([t], ref_c) for t in (24, 25)][-1]
    torch.testing.assert_close(got, torch.stack([want_c, want_a]), atol=1e-5, rtol=1e-5)


def test_decode_batch_refuses_bad_input(tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(), tiny_tokenizer, tmp_path / "m.cmx"))
    s = rt.new_session()
    rt.forward([5, 6], s)
    with pytest.raises(ValueError, match="appears twice"):
        rt.decode_batch([1, 2], [s, s])
    with pytest.raises(ValueError, match="2 token ids for 1 sessions"):
        rt.decode_batch([1, 2], [s])


@pytest.mark.parametrize("kernels", ["auto", "native"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fork_from_a_checkpoint_equals_recomputing(variant, kernels, tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(**VARIANTS[variant]), tiny_tokenizer, tmp_path / "m.cmx"), kernels=kernels)
    ids = torch.randint(4, 300, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    s = rt.new_session()
    rt.forward(ids[:13], s)
    ck = rt.checkpoint(s)
    for t in ids[13:30]:  # decoded token by token: the hybrid window wraps in its ring buffer
        rt.forward([t], s)
    ck_ring = rt.checkpoint(s)
    rt.forward(ids[30:35], s)
    want = rt.forward(ids, rt.new_session(), all_logits=True)
    for pos, checkpoint in ((13, ck), (30, ck_ring)):
        f = rt.fork(s, pos, checkpoint)
        assert f.pos == pos and f.tokens == ids[:pos]
        torch.testing.assert_close(rt.forward(ids[pos:], f, all_logits=True), want[pos:], atol=2e-4, rtol=1e-4)
    # at the session's own end no checkpoint is needed; the original is untouched by its forks
    f = rt.fork(s, 35)
    torch.testing.assert_close(rt.forward(ids[35:], f, all_logits=True), want[35:], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(rt.forward(ids[35:], s, all_logits=True), want[35:], atol=2e-4, rtol=1e-4)
    assert rt.fork(s, 0).pos == 0


def test_softmax_caches_cut_anywhere_linear_states_need_a_checkpoint(tiny_tokenizer, tmp_path):
    ids = list(range(10, 40))
    soft = Runtime(export_cmx(_model(**VARIANTS["softmax"]), tiny_tokenizer, tmp_path / "s.cmx"))
    s = soft.new_session()
    soft.forward(ids, s)
    want = soft.forward(ids, soft.new_session(), all_logits=True)
    for pos in (1, 7, 29):
        torch.testing.assert_close(soft.forward(ids[pos:], soft.fork(s, pos), all_logits=True), want[pos:],
                                   atol=2e-4, rtol=1e-4)
    lin = Runtime(export_cmx(_model(**VARIANTS["linear_elu_decay"]), tiny_tokenizer, tmp_path / "l.cmx"))
    s = lin.new_session()
    lin.forward(ids[:10], s)
    ck = lin.checkpoint(s)
    lin.forward(ids[10:], s)
    with pytest.raises(ValueError, match="cannot be cut back"):
        lin.fork(s, 7)
    with pytest.raises(ValueError, match="checkpoint is at 10 tokens, not 7"):
        lin.fork(s, 7, ck)
    with pytest.raises(ValueError, match="outside"):
        lin.fork(s, 31)
    assert ck.nbytes() > 0 and ck.pos == 10


def test_a_checkpoint_is_a_copy(tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(**VARIANTS["hybrid_hedgehog"]), tiny_tokenizer, tmp_path / "m.cmx"))
    s = rt.new_session()
    rt.forward(list(range(5, 20)), s)
    ck = rt.checkpoint(s)
    before = [{k: v.clone() for k, v in layer.items()} if layer else None for layer in ck.layers]
    for t in range(20, 40):
        rt.forward([t], s)
    for was, now in zip(before, ck.layers):
        assert (was is None) == (now is None)
        if was:
            assert all(torch.equal(was[k], now[k]) for k in was)


@pytest.mark.parametrize("kernels", ["auto", "native"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_prefill_equals_each_prompt_alone(variant, kernels, tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(**VARIANTS[variant]), tiny_tokenizer, tmp_path / "m.cmx"), kernels=kernels)
    chunks = _prompts(6, seed=3) + [[7]]  # a one-token chunk too
    batched = [rt.new_session() for _ in chunks]
    for i, s in enumerate(batched[:3]):  # some sessions already hold tokens (a prompt's later chunk)
        rt.forward(list(range(10, 14 + 5 * i)), s)
    alone = [rt.fork(s, s.pos) for s in batched]
    got = rt.prefill_batch(chunks, batched)
    want = torch.stack([rt.forward(c, s) for c, s in zip(chunks, alone)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and decoding goes on from identical states
    ids = want.argmax(-1).tolist()
    torch.testing.assert_close(rt.decode_batch(ids, batched), torch.stack([rt.forward([t], s) for t, s in
                                                                           zip(ids, alone)]), atol=1e-4, rtol=1e-4)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]


def test_decoding_rows_beside_prompts_are_exact_in_an_int_model(tiny_tokenizer, tmp_path):
    """The server's mixed step: decoding sessions' next tokens as one-row chunks of a `prefill_batch` beside other
    sessions' prompts give bit for bit the logits each gets decoding alone (every linear layer and the head in int
    kernels: their prompt path computes each row as the one-row path does; attention and the linear states run
    each row as its own decoding step)."""
    rt = _int_runtime(tiny_tokenizer, tmp_path)
    decoding, alone = [rt.new_session() for _ in range(5)], [rt.new_session() for _ in range(5)]
    for i, (s, a) in enumerate(zip(decoding, alone)):  # the same tokens (past the hybrid window for some); not
        for session in (s, a):  # a fork: it lays the window out in time order, which changes its sums' order
            rt.forward(list(range(10, 14 + 7 * i)), session)
            rt.forward([60 + i], session)
    prompts = _prompts(3, seed=7)
    fresh = [rt.new_session() for _ in prompts]
    ids = [31, 32, 33, 34, 35]
    got = rt.prefill_batch(prompts[:2] + [[t] for t in ids] + prompts[2:], fresh[:2] + decoding + fresh[2:])
    want = torch.stack([rt.forward([t], s) for t, s in zip(ids, alone)])
    assert torch.equal(got[2:7], want)
    assert torch.equal(got[[0, 1, 7]], torch.stack([rt.forward(p, rt.new_session()) for p in prompts]))
    # and the next step, decoding alone, goes on from identical states
    assert torch.equal(rt.decode_batch([40] * 5, decoding), torch.stack([rt.forward([40], s) for s in alone]))


def test_prefill_batch_refuses_bad_input(tiny_tokenizer, tmp_path):
    rt = Runtime(export_cmx(_model(), tiny_tokenizer, tmp_path / "m.cmx"))
    s = rt.new_session()
    with pytest.raises(ValueError, match="appears twice"):
        rt.prefill_batch([[1], [2]], [s, s])
    with pytest.raises(ValueError, match="non-empty"):
        rt.prefill_batch([[1], []], [s, rt.new_session()])


@pytest.mark.parametrize("bits", [4, 3])
def test_a_softmax_layers_step_in_one_call_equals_its_calls_one_by_one(bits, tiny_tokenizer, tmp_path):
    """`ext.softmax_step` (a softmax layer's decoding step in one native call, where every matmul is in panels of
    one width) against `forward_rows` making the same calls from Python: bit for bit, logits, KV caches and their
    lengths, for one and several sequences; layers it cannot take (a hybrid one, a float model's) keep the calls."""
    model = _model(layer_types=["softmax", "hybrid", "softmax"], num_hidden_layers=3, feature_map="hedgehog")
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default=f"int{bits}_g32",
                                                    rules=[{"pattern": "lm_head", "scheme": "int8"}]))
    rt = Runtime(export_cmx(model, tiny_tokenizer, tmp_path / "q.cmx"))
    if rt.kernels != "cmx" or not rt.layers[0].ext.panels():
        pytest.skip("no panel kernels here (codexmini's kernels with AVX-512 VNNI)")
    assert [layer._step is not None for layer in rt.layers] == [True, False, True]
    steps = [layer._step for layer in rt.layers]
    for B in (1, 3):
        prompts = _prompts(B, seed=B)
        runs = []
        for one_call in (True, False):
            for layer, step in zip(rt.layers, steps):
                layer._step = step if one_call else None
            sessions = [rt.new_session() for _ in prompts]
            for p, s in zip(prompts, sessions):
                rt.forward(p, s)
            runs.append((torch.stack([rt.decode_batch([7 + b for b in range(B)], sessions) for _ in range(5)]),
                         sessions))
        (fast, s_fast), (calls, s_calls) = runs
        assert torch.equal(fast, calls)
        for a, b in zip(s_fast, s_calls):
            for la, lb in zip(a.layers, b.layers):
                if "k" in la:
                    n = la["n"]
                    assert n == lb["n"] and torch.equal(la["k"][:, :n], lb["k"][:, :n])
                    assert torch.equal(la["v"][:, :n], lb["v"][:, :n])
    float_rt = Runtime(export_cmx(_model(), tiny_tokenizer, tmp_path / "f.cmx"))
    assert all(layer._step is None for layer in float_rt.layers)


def test_q_k_v_in_different_schemes_take_the_attention_kernels(tiny_tokenizer, tmp_path, monkeypatch):
    """A per-tensor allocation leaves q, k and v in different schemes (no fused kernel): their outputs are joined and
    codexmini's rope and attention kernels take them, as a fused layer's, instead of torch's attention per sequence
    (a quickstart model's 8-sequence step: 10.5-11.6 -> 5.2-5.4 ms); logits stay within float rounding of the
    PyTorch model (fp32 activations) and a batched step equals each sequence alone."""
    from codexmini.runtime.model import Layer

    model = _model(layer_types=["softmax", "hybrid"], feature_map="hedgehog")
    model, _ = quantize_model(model, QuantizeConfig(method="rtn", default="int4_g32",
                                                    rules=[{"pattern": "v_proj", "scheme": "int8"}]))
    path = export_cmx(model, tiny_tokenizer, tmp_path / "mixed.cmx")
    rt = Runtime(path, act_dtype="float32")
    if rt.kernels != "cmx":
        pytest.skip("codexmini's kernels did not build here")
    assert all(layer.qkv is None for layer in rt.layers)

    def torch_attention(*args):
        raise AssertionError("torch's attention ran: the kernels' path was not taken")

    monkeypatch.setattr(Layer, "_softmax", torch_attention)
    ids = torch.randint(4, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    s = rt.new_session()
    got = torch.cat([rt.forward(ids[0, :12], s, all_logits=True)]
                    + [rt.forward(ids[0, t:t + 1], s, all_logits=True) for t in range(12, 30)])
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids).logits[0], atol=2e-4, rtol=1e-4)
    tokens_b, tokens_a, worst, _, _ = _decode_pair(Runtime(path), _prompts(3, seed=4), 10)
    assert tokens_b == tokens_a and worst == 0
