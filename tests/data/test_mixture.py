import re

import pytest
import torch

from codexmini.data import DataConfig, build_data
from codexmini.data.mixture import interleave_blocks, round_robin


def _mixture(alpha, beta, **overrides):
    sources = [{"name": "alpha", "source": str(alpha), "file_glob": "*.txt", "weight": 3.0},
               {"name": "beta", "source": str(beta), "file_glob": "*.txt", "weight": 1.0}]
    return DataConfig(sources=sources, block_size=32, val_fraction=0.2, **overrides)


def _markers(tokenizer, blocks, prefix):
    return set(re.findall(rf"{prefix}doc\d+", tokenizer.decode(blocks.flatten())))


def test_weights_are_respected_and_every_domain_keeps_its_own_held_out_documents(two_domains, tiny_tokenizer):
    alpha, beta = two_domains
    bundle = build_data(_mixture(alpha, beta), tiny_tokenizer)
    domains = bundle.stats["domains"]
    assert set(bundle.val_domains) == {"alpha", "beta"}
    share = domains["alpha"]["blocks_train"] / len(bundle.train)
    assert abs(share - 0.75) < 0.08, share
    assert domains["alpha"]["weight"] == pytest.approx(0.75)
    for name in ("alpha", "beta"):
        assert domains[name]["documents_val"] == 2 and domains[name]["documents_train"] == 8
        val_docs = _markers(tiny_tokenizer, bundle.val_domains[name], name)
        train_docs = _markers(tiny_tokenizer, bundle.train, name)
        assert val_docs and train_docs and not val_docs & train_docs  # held out by document
        other = "beta" if name == "alpha" else "alpha"
        assert not _markers(tiny_tokenizer, bundle.val_domains[name], other)  # a domain's blocks are its own
    # val is every domain's blocks, in turn, so a prefix covers both.
    assert len(bundle.val) == sum(len(v) for v in bundle.val_domains.values())
    assert torch.equal(bundle.val[0], bundle.val_domains["alpha"][0])
    assert torch.equal(bundle.val[1], bundle.val_domains["beta"][0])
    assert bundle.stats["blocks_val"] == len(bundle.val) and bundle.stats["blocks_train"] == len(bundle.train)


def test_calibration_takes_every_training_domain_in_turn_whatever_the_weights(two_domains, tiny_tokenizer):
    alpha, beta = two_domains
    bundle = build_data(_mixture(alpha, beta, num_calibration=6), tiny_tokenizer)  # weights 3:1
    assert len(bundle.calibration) == 6
    text = tiny_tokenizer.decode(bundle.calibration.flatten())
    assert text.count("of alpha text") == pytest.approx(text.count("of beta text"), rel=0.25)
    assert not _markers(tiny_tokenizer, bundle.calibration, "alpha") & _markers(
        tiny_tokenizer, bundle.val_domains["alpha"], "alpha")  # training documents only
    assert len(build_data(_mixture(alpha, beta, num_calibration=0), tiny_tokenizer).calibration) == 0


def test_mixtures_are_deterministic_and_the_seed_changes_them(two_domains, tiny_tokenizer):
    alpha, beta = two_domains
    a, b = build_data(_mixture(alpha, beta), tiny_tokenizer), build_data(_mixture(alpha, beta), tiny_tokenizer)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and torch.equal(a.calibration, b.calibration)
    assert all(torch.equal(a.val_domains[k], b.val_domains[k]) for k in a.val_domains)
    c = build_data(_mixture(alpha, beta, seed=1), tiny_tokenizer)
    assert not torch.equal(a.train[: len(c.train)], c.train[: len(a.train)])


def test_first_exhausted_is_shorter_and_max_train_blocks_caps(two_domains, tiny_tokenizer):
    alpha, beta = two_domains
    bundle = build_data(_mixture(alpha, beta, mixture_stopping="first_exhausted"), tiny_tokenizer)
    full = build_data(_mixture(alpha, beta), tiny_tokenizer)
    assert len(bundle.train) < len(full.train)  # all_exhausted repeats the smaller share
    capped = build_data(_mixture(alpha, beta, max_train_blocks=20), tiny_tokenizer)
    assert len(capped.train) == 20 and torch.equal(capped.train, full.train[:20])


def test_eval_only_domain_gives_validation_blocks_and_no_training_blocks(two_domains, tiny_tokenizer):
    alpha, beta = two_domains
    cfg = _mixture(alpha, beta)
    cfg.sources[1].eval_only = True
    bundle = build_data(cfg, tiny_tokenizer)
    assert bundle.stats["domains"]["beta"]["blocks_train"] == 0
    assert bundle.stats["domains"]["beta"]["documents_val"] == 10  # every document held out
    assert not _markers(tiny_tokenizer, bundle.train, "beta")
    assert _markers(tiny_tokenizer, bundle.val_domains["beta"], "beta")


def test_single_source_fields_are_a_one_element_mixture(two_domains, tiny_tokenizer):
    alpha, _ = two_domains
    single = build_data(DataConfig(source=str(alpha), file_glob="*.txt", block_size=32, val_fraction=0.2),
                        tiny_tokenizer)
    listed = build_data(DataConfig(sources=[{"source": str(alpha), "file_glob": "*.txt"}], block_size=32,
                                   val_fraction=0.2), tiny_tokenizer)
    assert torch.equal(single.train, listed.train) and torch.equal(single.val, listed.val)
    assert list(single.val_domains) == ["alpha"] and torch.equal(single.val_domains["alpha"], single.val)


def test_interleave_and_round_robin_helpers():
    a, b = torch.zeros(30, 4, dtype=torch.long), torch.ones(10, 4, dtype=torch.long)
    mixed, names = interleave_blocks({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, seed=0)
    assert names.count("b") == (mixed[:, 0] == 1).sum() and set(names) == {"a", "b"}
    assert names.count("a") >= 30 and names.count("b") >= 10
    # Rows numbered uniquely: first_exhausted draws each at most once and stops when a domain runs out.
    a, b = torch.arange(40).view(20, 2), torch.arange(100, 120).view(10, 2)
    once, names = interleave_blocks({"a": a, "b": b}, {"a": 3.0, "b": 1.0}, seed=0, stopping="first_exhausted")
    assert len(torch.unique(once, dim=0)) == len(once) and (names.count("a") == 20 or names.count("b") == 10)
    rr = round_robin({"a": a[:3], "b": b[:1]})
    assert rr[:, 0].tolist() == [0, 100, 2, 4]


def test_the_corpus_without_the_teacher(two_domains, tiny_tokenizer):
    from codexmini.data import load_documents

    alpha, beta = two_domains
    cfg = _mixture(alpha, beta)
    cfg.sources.append(cfg.sources[0].__class__(name="samples", source="teacher"))
    assert [s.name for s in cfg.without_teacher().sources] == ["alpha", "beta"]
    cfg.sources[1].eval_only = True
    docs = load_documents(cfg)  # training sources with files only: what a tokenizer can be trained on
    assert len(docs) == 10 and all("alphadoc" in t for t in docs["text"])
    bundle = build_data(cfg.without_teacher(), tiny_tokenizer)
    assert list(bundle.val_domains) == ["alpha", "beta"]
    with pytest.raises(ValueError, match="every source is source=teacher"):
        DataConfig(sources=[{"source": "teacher"}]).without_teacher()
