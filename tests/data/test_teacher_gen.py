import copy
import json

import pytest
import torch

from codexmini.data import DataConfig, build_data, generate_batch, load_prompts, model_fingerprint
from codexmini.data.teacher_gen import SEED_PROMPTS, split_prompts, teacher_samples


def _cfg(cache, **teacher):
    settings = {"name": "samples", "source": "teacher", "num_samples": 12, "max_new_tokens": 12,
                "gen_batch_size": 4, "temperature": 0.8, **teacher}
    return DataConfig(block_size=16, cache_dir=str(cache), val_fraction=0.2,
                      sources=[{"source": "stdlib", "max_files": 5}, settings])


def test_shipped_prompts_cover_every_kind_and_validation_prompts_are_held_out():
    prompts = load_prompts()
    kinds = {p["kind"] for p in prompts}
    assert {"prose", "explanation", "code", "dialogue", "lists"} <= kinds and SEED_PROMPTS.is_file()
    train, val = split_prompts(prompts, 0.1, seed=0)
    assert {p["kind"] for p in val} == kinds  # every kind keeps held-out prompts
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}
    assert len(train) + len(val) == len(prompts)
    assert split_prompts(prompts, 0.1, seed=0) == (train, val) and split_prompts(prompts, 0.1, seed=1) != (train,
                                                                                                            val)


def test_a_user_prompt_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\nWrite a haiku.\n\nWrite a limerick.\nWrite a haiku.\n")
    assert [p["prompt"] for p in load_prompts(path)] == ["Write a haiku.", "Write a limerick."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        load_prompts(bad)


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(gen_teacher, tiny_tokenizer):
    model, _ = gen_teacher
    prompts = [p["prompt"] for p in load_prompts()][::6]  # lengths differ, so the batch is left-padded
    assert len({len(tiny_tokenizer(p)["input_ids"]) for p in prompts}) > 1
    batched = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=16, temperature=0)
    alone = [generate_batch(model, tiny_tokenizer, [p], max_new_tokens=16, temperature=0)[0] for p in prompts]
    assert [r["completion"] for r in batched] == [r["completion"] for r in alone]
    assert len({r["completion"] for r in batched}) > 1 and all(r["new_tokens"] > 0 for r in batched)
    assert all(r["text"] == r["prompt"] + r["completion"] for r in batched)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(gen_teacher, tiny_tokenizer):
    model, _ = gen_teacher
    prompts = ["def add(a, b):", "hello world"]
    state = torch.get_rng_state()
    a = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=12, temperature=1.0, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    b = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=12, temperature=1.0, seed=3)
    c = generate_batch(model, tiny_tokenizer, prompts, max_new_tokens=12, temperature=1.0, seed=4)
    assert a == b and a != c


def test_chat_template_wraps_prompts_when_the_tokenizer_has_one(gen_teacher, tiny_tokenizer):
    model, _ = gen_teacher
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    row = generate_batch(model, tok, ["Say hi."], max_new_tokens=4, temperature=0)[0]
    assert row["text"].startswith("<|bos|>user: Say hi.\nassistant:")
    plain = generate_batch(model, tok, ["Say hi."], max_new_tokens=4, temperature=0, chat_template=False)[0]
    assert plain["text"].startswith("Say hi.")


def test_teacher_data_is_generated_once_then_reused_from_the_cache(gen_teacher, tiny_tokenizer, tmp_path):
    model, counter = gen_teacher
    first = build_data(_cfg(tmp_path), tiny_tokenizer, teacher=model, progress=False)
    info = first.stats["teacher_generation"]["samples"]
    assert counter.calls == 3 + 1  # 12 training samples in batches of 4, 2 validation samples in one batch
    assert info["train"]["generated"] == 12 and info["val"]["generated"] == 2
    assert "samples" in first.val_domains and first.stats["domains"]["samples"]["blocks_train"] > 0
    again = build_data(_cfg(tmp_path), tiny_tokenizer, teacher=model, progress=False)
    assert counter.calls == 4  # no generate call: every batch came from the cache
    assert again.stats["teacher_generation"]["samples"]["train"]["reused"] == 12
    assert torch.equal(first.train, again.train) and torch.equal(first.val, again.val)
    # Any generation setting changes the key: generated again, into a new cache folder.
    changed = build_data(_cfg(tmp_path, temperature=0.5), tiny_tokenizer, teacher=model, progress=False)
    assert counter.calls == 8
    assert changed.stats["teacher_generation"]["samples"]["train"]["key"] != info["train"]["key"]
    # Different weights: a different teacher, a different key.
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    build_data(_cfg(tmp_path), tiny_tokenizer, teacher=model, progress=False)
    assert counter.calls == 12


def test_an_interrupted_generation_resumes_after_the_last_complete_batch(gen_teacher, tiny_tokenizer, tmp_path):
    model, counter = gen_teacher
    prompts = load_prompts()
    kwargs = dict(num_samples=10, max_new_tokens=8, gen_batch_size=4, temperature=1.0, progress=False)
    counter.fail_at = 3  # batches 0 and 1 are written, the third call dies
    with pytest.raises(KeyboardInterrupt):
        teacher_samples(model, tiny_tokenizer, prompts, cache_dir=tmp_path / "a", **kwargs)
    folder = next((tmp_path / "a").iterdir())
    assert sorted(p.name for p in folder.glob("chunk-*")) == ["chunk-00000.jsonl", "chunk-00001.jsonl"]
    assert not list(folder.glob(".*tmp"))  # nothing half-written is left under a chunk's name
    counter.fail_at, counter.calls = None, 0
    resumed, info = teacher_samples(model, tiny_tokenizer, prompts, cache_dir=tmp_path / "a", **kwargs)
    assert counter.calls == 1 and info["reused"] == 8 and info["generated"] == 4
    straight, _ = teacher_samples(model, tiny_tokenizer, prompts, cache_dir=tmp_path / "b", **kwargs)
    assert [r["text"] for r in resumed] == [r["text"] for r in straight] and len(resumed) == 10
    # More samples later only generates the new batches.
    counter.calls = 0
    more, info = teacher_samples(model, tiny_tokenizer, prompts, cache_dir=tmp_path / "a",
                                 **{**kwargs, "num_samples": 14})
    assert counter.calls == 1 and [r["text"] for r in more[:10]] == [r["text"] for r in resumed]


def test_identical_samples_are_kept_once(gen_teacher, tiny_tokenizer, tmp_path):
    model, _ = gen_teacher
    prompts = load_prompts()[:3]
    rows, info = teacher_samples(model, tiny_tokenizer, prompts, num_samples=9, max_new_tokens=6, temperature=0,
                                 gen_batch_size=9, cache_dir=tmp_path, progress=False)
    assert len(rows) == 3 and info["duplicates_dropped"] == 6  # greedy: the same prompt gives the same text
    lines = [json.loads(x) for f in sorted(tmp_path.rglob("chunk-*")) for x in f.read_text().splitlines()]
    assert len(lines) == 9


def test_no_teacher_is_an_error_naming_the_source(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"data.sources\[1\].source=teacher needs the teacher model"):
        build_data(_cfg(tmp_path), tiny_tokenizer)


def test_fingerprint_follows_the_weights(gen_teacher):
    model, _ = gen_teacher
    before = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == before
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1  # tied: the embedding changes too
    assert model_fingerprint(model) != before
