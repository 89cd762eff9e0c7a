import random

import datasets

from codexmini.data import DataConfig, split_documents
from codexmini.data.dedup import near_duplicate_groups


def _prose(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper", "seven", "quiet", "green",
             "table", "north", "light", "sound", "frame", "metal", "honey", "zebra", "orbit"]
    return " ".join(rng.choice(words) for _ in range(n))


def test_near_duplicates_share_a_group_and_distinct_texts_do_not():
    base = _prose(0)
    edited = "NAME foo-extra\n" + base.replace("river", "lake", 3) + " see also foo"  # a man page of one family
    contained = base[: len(base) // 2]  # a short text wholly inside a longer one
    texts = [base, _prose(1), edited, _prose(2), contained, ""]
    g = near_duplicate_groups(texts)
    assert g[0] == g[2] == g[4]
    assert len({g[0], g[1], g[3], g[5]}) == 4
    assert g == near_duplicate_groups(texts)  # deterministic


def test_a_split_keeps_each_family_of_near_duplicates_on_one_side():
    families = [[_prose(f) + f" variant {v}" for v in range(3)] for f in range(10)]
    texts = [t for fam in families for t in fam]
    ds = datasets.Dataset.from_dict({"text": texts})
    for seed in range(3):
        train, val = split_documents(ds, DataConfig(seed=seed), val_fraction=0.2)
        assert len(train) + len(val) == len(texts) and len(val) == 6
        held, trained = set(val["text"]), set(train["text"])
        for fam in families:
            assert set(fam) <= held or set(fam) <= trained, "a family was split across train and held-out"


def test_every_text_a_near_duplicate_falls_back_to_single_documents():
    ds = datasets.Dataset.from_dict({"text": [_prose(0) + f" copy {i}" for i in range(5)]})
    train, val = split_documents(ds, DataConfig(), val_fraction=0.4)
    assert len(val) == 2 and len(train) == 3


def test_a_big_corpus_samples_more_sparsely_and_still_finds_copies(monkeypatch):
    from codexmini.data import dedup

    texts = [_prose(i, 2000) for i in range(6)]
    texts.append(texts[2].replace("river", "lake", 5))
    monkeypatch.setattr(dedup, "MAX_INDEXED", 500)  # ~14,000 words: one shingle in ~28 indexed
    g = near_duplicate_groups(texts)
    assert g[2] == g[6] and len(set(g)) == 6
