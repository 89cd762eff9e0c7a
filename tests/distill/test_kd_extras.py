"""Hidden-state matching, on-policy (GKD) and sequence-level batches, the offline top-k teacher cache, a bitsandbytes
teacher."""

import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.distill import DistillConfig, distill
from codexmini.train import TrainerConfig
from codexmini.distill.hidden import HiddenProjector, hidden_state_loss, layer_map
from codexmini.distill.loop import batch_source, check_configs, is_on_policy, sample_on_policy
from codexmini.distill.teacher_cache import TeacherLogitCache, dense_logits, topk_pack
from tests.conftest import tiny_config
from tests.distill.test_loop import _trainer, blocks, trained_teacher  # noqa: F401  (module fixtures)


def test_layer_map_defaults_and_errors():
    student = tiny_config(num_hidden_layers=2, layer_types=["softmax", "linear"])
    teacher = tiny_config(num_hidden_layers=6, layer_types=["softmax"] * 6)
    assert layer_map(student, teacher) == [(0, 2), (1, 5)]  # evenly spaced, last meets last
    student.source_layers = [1, 4]
    assert layer_map(student, teacher) == [(0, 1), (1, 4)]  # where the layers were copied from
    assert layer_map(student, teacher, [1], [3]) == [(1, 3)]
    with pytest.raises(ValueError, match="hidden_teacher_layers has 1 entries"):
        layer_map(student, teacher, [0, 1], [3])
    with pytest.raises(ValueError, match=r"hidden_teacher_layers \[9\]"):
        layer_map(student, teacher, [0], [9])
    with pytest.raises(ValueError, match=r"hidden_student_layers \[5\]"):
        layer_map(student, teacher, [5])


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_is_zero_on_equal_states_and_positive_otherwise(kind):
    hs = tuple(torch.randn(2, 5, 8) for _ in range(3))
    proj = HiddenProjector(2, 8, 8)
    assert hidden_state_loss(hs, hs, [(0, 0), (1, 1)], proj, kind) == pytest.approx(0.0, abs=1e-6)
    other = tuple(torch.randn(2, 5, 8) for _ in range(3))
    assert hidden_state_loss(hs, other, [(0, 0), (1, 1)], proj, kind) > 0.1
    # Normalised MSE directly: ||a - b||^2 / mean(b^2), averaged over tokens and layers.
    if kind == "mse":
        ref = sum(((hs[i + 1] - other[i + 1]) ** 2).mean(-1).mean() / (other[i + 1] ** 2).mean() for i in (0, 1)) / 2
        torch.testing.assert_close(hidden_state_loss(hs, other, [(0, 0), (1, 1)], proj, kind), ref)


def test_narrower_student_learns_teacher_hidden_states_through_projection(blocks, trained_teacher):  # noqa: F811
    student = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "hybrid"]))  # width 64, teacher 96
    student, metrics = distill(student, trained_teacher, blocks.train, blocks.val,
                               DistillConfig(kd_ratio=0.5, hidden_weight=1.0, hidden_loss="cosine"),
                               _trainer(max_steps=25), tokenizer=blocks.tokenizer)
    assert metrics["hidden_layer_map"] == [(0, 0), (1, 1)]
    assert metrics["val_ppl"] < 100


def test_hidden_matching_lowers_the_hidden_term(blocks, trained_teacher, tmp_path):  # noqa: F811
    import json

    student = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "linear"], hidden_size=96))
    _, metrics = distill(student, trained_teacher, blocks.train, blocks.val,
                         DistillConfig(kd_ratio=1.0, hidden_weight=1.0), _trainer(max_steps=20, log_every=1),
                         workdir=tmp_path, tokenizer=blocks.tokenizer)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    hidden = [r["hidden"] for r in logged if "hidden" in r]
    assert len(hidden) == 20 and sum(hidden[-4:]) / 4 < 0.7 * sum(hidden[:4]) / 4, hidden
    assert metrics["hidden_layer_map"] == [(0, 0), (1, 1)]


def test_on_policy_sampling_masks_the_prompt_and_keeps_training_rng(blocks):  # noqa: F811
    model = CodexMiniForCausalLM(tiny_config())
    ids = blocks.train[:2]
    cfg = DistillConfig(on_policy_fraction=1.0, on_policy_prompt_tokens=8, on_policy_new_tokens=12)
    state = torch.get_rng_state()
    seqs, labels = sample_on_policy(model, ids, cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert seqs.shape == (2, 20) and torch.equal(seqs[:, :8], ids[:, :8])
    assert (labels[:, :8] == -100).all() and torch.equal(labels[:, 8:], seqs[:, 8:])
    again, _ = sample_on_policy(model, ids, cfg, seed=5)
    assert torch.equal(seqs, again)  # seeded: a resumed run draws the same samples
    draws = [is_on_policy(s, 0.25, seed=0) for s in range(400)]
    assert 0.15 < sum(draws) / 400 < 0.35 and not is_on_policy(3, 0.0, 0)
    with pytest.raises(ValueError, match="on_policy_prompt_tokens"):
        sample_on_policy(model, ids, DistillConfig(on_policy_prompt_tokens=64), seed=0)


def test_on_policy_distillation_trains_on_student_samples(blocks, trained_teacher):  # noqa: F811
    student = CodexMiniForCausalLM(tiny_config())
    from codexmini.data import perplexity

    before = perplexity(student, blocks.val)["ppl"]
    student, metrics = distill(student, trained_teacher, blocks.train, blocks.val,
                               DistillConfig(loss="jsd", on_policy_fraction=0.5, on_policy_prompt_tokens=8,
                                             on_policy_new_tokens=16), _trainer(max_steps=16),
                               tokenizer=blocks.tokenizer)
    expected = sum(is_on_policy(s, 0.5, 0) for s in range(16)) * 4
    assert metrics["on_policy_blocks"] == expected > 0
    assert metrics["val_ppl"] < before


def test_batch_sources_split_one_draw_per_step():
    cfg = DistillConfig(on_policy_fraction=0.25, sequence_level_fraction=0.5)
    kinds = [batch_source(s, cfg, seed=0) for s in range(800)]
    # The student's share is the on-policy draw itself, so adding a teacher share leaves those steps alone.
    assert [k == "student" for k in kinds] == [is_on_policy(s, 0.25, 0) for s in range(800)]
    assert 0.4 < kinds.count("teacher") / 800 < 0.6 and 0.15 < kinds.count("data") / 800 < 0.35
    assert set(batch_source(s, DistillConfig(), 0) for s in range(50)) == {"data"}
    assert set(batch_source(s, DistillConfig(sequence_level_fraction=1.0), 3) for s in range(50)) == {"teacher"}
    with pytest.raises(ValueError, match=r"on_policy_fraction .*sequence_level_fraction .*more than 1"):
        check_configs(DistillConfig(on_policy_fraction=0.5, sequence_level_fraction=0.6), _trainer())


def test_sequence_level_samples_are_the_teachers_greedy_continuation(blocks, trained_teacher):  # noqa: F811
    ids = blocks.train[:3]
    cfg = DistillConfig(sequence_level_fraction=1.0, on_policy_prompt_tokens=8, on_policy_new_tokens=12)
    seqs, labels = sample_on_policy(trained_teacher, ids, cfg, seed=1, temperature=0.0)
    assert seqs.shape == (3, 20) and torch.equal(seqs[:, :8], ids[:, :8])
    assert (labels[:, :8] == -100).all() and torch.equal(labels[:, 8:], seqs[:, 8:])
    # Greedy: each new token is the teacher's argmax after the tokens before it, whatever the seed.
    with torch.no_grad():
        argmax = trained_teacher(input_ids=seqs).logits.argmax(-1)
    assert torch.equal(argmax[:, 7:-1], seqs[:, 8:])
    assert torch.equal(sample_on_policy(trained_teacher, ids, cfg, seed=9, temperature=0.0)[0], seqs)
    hot = sample_on_policy(trained_teacher, ids, cfg, seed=1, temperature=2.0)[0]
    assert not torch.equal(hot, seqs) and torch.equal(hot, sample_on_policy(trained_teacher, ids, cfg, seed=1,
                                                                             temperature=2.0)[0])


def test_a_padded_teacher_vocabulary_never_reaches_the_student():
    torch.manual_seed(0)
    teacher = CodexMiniForCausalLM(tiny_config(vocab_size=320, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        teacher.lm_head.weight[:300] = 0  # every real token scores 0: the padding rows win unless suppressed
    ids = torch.randint(4, 300, (2, 16))
    cfg = DistillConfig(on_policy_prompt_tokens=4, on_policy_new_tokens=8)
    free = sample_on_policy(teacher, ids, cfg, seed=0, temperature=0.0)[0]
    assert (free[:, 4:] >= 300).any()
    kept = sample_on_policy(teacher, ids, cfg, seed=0, temperature=0.0, vocab_size=300)[0]
    assert (kept < 300).all()


def test_sequence_level_distillation_trains_on_teacher_samples(blocks, trained_teacher, tmp_path):  # noqa: F811
    from codexmini.data import perplexity

    cfg = DistillConfig(kd_ratio=0.0, sequence_level_fraction=1.0, on_policy_prompt_tokens=8, on_policy_new_tokens=24)
    torch.manual_seed(0)
    probe = sample_on_policy(trained_teacher, blocks.val, cfg, seed=123, temperature=0.0)[0]
    student = CodexMiniForCausalLM(tiny_config())
    before = perplexity(student, probe)["ppl"]
    student, metrics = distill(student, trained_teacher, blocks.train, blocks.val, cfg, _trainer(max_steps=20),
                               tokenizer=blocks.tokenizer)
    assert metrics["sequence_level_blocks"] == 20 * 4 and metrics["on_policy_blocks"] == 0
    # Cross-entropy on nothing but the teacher's continuations: the student now predicts them far better.
    assert perplexity(student, probe)["ppl"] < 0.5 * before
    with pytest.raises(ValueError, match="needs a teacher"):
        distill(CodexMiniForCausalLM(tiny_config()), None, blocks.train, blocks.val, cfg, _trainer(max_steps=1))


def test_dense_logits_are_exact_on_top_k_and_keep_the_tail_mass():
    logits = torch.randn(3, 7, 50) * 3
    full = torch.log_softmax(logits.half().float(), -1)  # the cache stores logits in fp16
    pack = topk_pack(logits, 50)
    torch.testing.assert_close(torch.log_softmax(dense_logits(**pack, vocab_size=50), -1), full, atol=1e-5, rtol=0)
    pack = topk_pack(logits, 8)
    rebuilt = torch.log_softmax(dense_logits(**pack, vocab_size=50), -1)
    top = pack["indices"].long()
    torch.testing.assert_close(rebuilt.gather(-1, top), full.gather(-1, top), atol=1e-2, rtol=0)
    assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(3, 7), atol=1e-5)


def test_teacher_cache_is_computed_once_and_reused_exactly(blocks, trained_teacher, tmp_path):  # noqa: F811
    cfg = DistillConfig(kd_ratio=1.0, teacher_cache=str(tmp_path / "cache"), teacher_top_k=300)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(distill(CodexMiniForCausalLM(tiny_config()), trained_teacher, blocks.train, blocks.val, cfg,
                            _trainer(max_steps=10), tokenizer=blocks.tokenizer)[1])
    assert runs[0]["teacher_cache"]["shards_computed"] >= 1
    assert runs[1]["teacher_cache"]["shards_computed"] == 0  # all read back from disk
    assert runs[1]["val_ppl"] == runs[0]["val_ppl"]
    # With k = vocabulary the cached teacher is the teacher: training matches the online run closely.
    torch.manual_seed(0)
    online = distill(CodexMiniForCausalLM(tiny_config()), trained_teacher, blocks.train, blocks.val,
                     DistillConfig(kd_ratio=1.0), _trainer(max_steps=10), tokenizer=blocks.tokenizer)[1]
    assert runs[0]["val_ppl"] == pytest.approx(online["val_ppl"], rel=1e-2)
    # A different teacher gets its own cache entry, never the stale one.
    other = CodexMiniForCausalLM(tiny_config(hidden_size=96, layer_types=["softmax", "softmax"]))
    c = TeacherLogitCache(tmp_path / "cache", other, blocks.train, 300, 300)
    assert c.dir.name != runs[0]["teacher_cache"]["dir"].rsplit("/", 1)[-1]
    with pytest.raises(ValueError, match="hidden_weight"):
        distill(CodexMiniForCausalLM(tiny_config()), trained_teacher, blocks.train, blocks.val,
                DistillConfig(teacher_cache=str(tmp_path), hidden_weight=1.0), _trainer(max_steps=1))


def test_distill_from_a_bitsandbytes_8bit_teacher(tiny_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from codexmini.data import DataConfig, build_data
    from codexmini.models.from_teacher import student_from_teacher
    from codexmini.models.teacher import load_teacher
    from tests.conftest import CODE

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"d{i}.txt").write_text((CODE.replace("add", f"add{i}") + "\n") * 4)
    teacher, tok = load_teacher(tiny_llama_dir, quantization="int8")
    assert type(teacher.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    data = build_data(DataConfig(source=str(folder), file_glob="*.txt", block_size=32, val_fraction=0.3,
                                 max_val_blocks=4), tokenizer=tok)
    plain, _ = load_teacher(tiny_llama_dir)
    student = student_from_teacher(plain, layers=[0, 3], layer_types=["softmax", "linear"])
    student, metrics = distill(student, teacher, data.train, data.val,
                               DistillConfig(kd_ratio=1.0, hidden_weight=0.5), _trainer(max_steps=4),
                               tokenizer=tok)
    assert metrics["hidden_layer_map"] == [(0, 0), (1, 3)]  # from the student's source_layers
    assert torch.isfinite(torch.tensor(metrics["loss_curve"])).all() and metrics["val_ppl"] > 1
