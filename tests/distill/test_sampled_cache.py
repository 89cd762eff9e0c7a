"""The sampled offline teacher (Random-Sampling KD): unbiased where a top-k cache is not, and it trains."""

import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.data import perplexity
from codexmini.distill import DistillConfig, distill
from codexmini.distill.losses import divergence
from codexmini.distill.teacher_cache import (SampledHead, TeacherLogitCache, check_cache_settings, dense_logits,
                                             sample_pack, sampled_logits, topk_pack)
from tests.conftest import tiny_config
from tests.distill.test_loop import _trainer, blocks, trained_teacher  # noqa: F401  (module fixtures)


def _long_tail(vocab=200, rows=4):
    """Logits with a few likely tokens and a tail of very uneven small ones (what a top-k cache flattens)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g) * 2.0
    logits[:, :5] += 6.0
    return logits


def test_the_empirical_mass_of_the_draws_is_exact_and_unbiased():
    logits = _long_tail()
    p = torch.softmax(logits, -1)
    g = torch.Generator().manual_seed(1)
    k, trials = 64, 1500
    est = torch.zeros_like(p)
    for _ in range(trials):
        pack = sample_pack(logits, k, g)
        q = torch.softmax(sampled_logits(pack["indices"], p.shape[-1]), -1)
        counts = torch.zeros_like(p).scatter_add_(-1, pack["indices"].long(), torch.ones(pack["indices"].shape))
        torch.testing.assert_close(q, counts / k, atol=1e-6, rtol=0)  # softmax of the logits is count / k
        est += q
    est /= trials
    # Unbiased: the mean estimate is within a few standard errors of the true p, everywhere, tail included.
    # (plus a few counts' worth: for the rarest tokens a single hit is many standard errors).
    se = (p * (1 - p) / (k * trials)).sqrt()
    assert ((est - p).abs() <= 5 * se + 4 / (k * trials)).all()
    # A top-k pack of the same size flattens the tail: its error there is many times the sampled one's.
    topk = torch.softmax(dense_logits(**topk_pack(logits, 21), vocab_size=p.shape[-1]), -1)
    tail = p < p.sort(-1, descending=True).values[:, 20:21]
    assert (topk - p)[tail].abs().sum() > 5 * (est - p)[tail].abs().sum()


def test_forward_kl_gradient_against_the_draws_is_unbiased():
    """E over draws of d/ds KL(p_hat || softmax(s)) equals d/ds KL(p || softmax(s)) (the KD gradient)."""
    logits = _long_tail(vocab=50, rows=2)
    student = torch.randn(2, 50, requires_grad=True)
    divergence(student, logits).sum().backward()
    want, student.grad = student.grad.clone(), None
    g = torch.Generator().manual_seed(2)
    trials = 800
    for _ in range(trials):
        t = sampled_logits(sample_pack(logits, 16, g)["indices"], 50)
        divergence(student, t).sum().backward()
    got = student.grad / trials
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=0.01, rtol=0)


def test_sampled_cache_trains_reuses_its_shards_and_is_keyed_by_mode(blocks, trained_teacher, tmp_path):  # noqa: F811
    cfg = DistillConfig(kd_ratio=1.0, teacher_cache=str(tmp_path / "cache"), teacher_cache_mode="sample",
                        teacher_top_k=32)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(distill(CodexMiniForCausalLM(tiny_config()), trained_teacher, blocks.train, blocks.val, cfg,
                            _trainer(max_steps=10), tokenizer=blocks.tokenizer)[1])
    assert runs[0]["teacher_cache"]["shards_computed"] >= 1 and runs[1]["teacher_cache"]["shards_computed"] == 0
    assert runs[1]["val_ppl"] == runs[0]["val_ppl"]  # the same draws read back
    torch.manual_seed(0)
    assert runs[0]["val_ppl"] < perplexity(CodexMiniForCausalLM(tiny_config()), blocks.val)["ppl"]
    topk = TeacherLogitCache(tmp_path / "cache", trained_teacher, blocks.train, 32, 300)
    assert topk.dir.name != runs[0]["teacher_cache"]["dir"].rsplit("/", 1)[-1]
    assert isinstance(TeacherLogitCache(tmp_path / "cache", trained_teacher, blocks.train, 32, 300,
                                        mode="sample").head, SampledHead)


@pytest.mark.parametrize("args, message", [
    (("bogus", 8, "forward_kl", 1.0), "teacher_cache_mode 'bogus'"),
    (("sample", 0, "forward_kl", 1.0), "teacher_top_k must be >= 1"),
    (("sample", 8, "reverse_kl", 1.0), "unbiased only for distill.loss=forward_kl"),
    (("sample", 8, "forward_kl", 2.0), "distill.temperature=1"),
])
def test_bad_cache_settings_name_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        check_cache_settings(*args)
    check_cache_settings("topk", 8, "reverse_kl", 2.0)
