import json

import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.data import DataConfig, build_data, perplexity
from codexmini.distill import DistillConfig, distill
from codexmini.train import TrainerConfig
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    from tests.conftest import CODE

    folder = tmp_path_factory.mktemp("kd_corpus")
    for i in range(8):
        (folder / f"d{i}.txt").write_text((CODE.replace("Stack", f"Stack{i}") + "\n") * 6)
    data = build_data(DataConfig(source=str(folder), file_glob="*.txt", block_size=32, tokenizer_vocab_size=300,
                                 val_fraction=0.25, max_val_blocks=8))
    return data


def _trainer(**kw):
    base = dict(max_steps=30, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=1000, checkpoint_every=1000,
                mixed_precision="no", log_every=5)
    base.update(kw)
    return TrainerConfig(**base)


@pytest.fixture(scope="module")
def trained_teacher(blocks):
    torch.manual_seed(1)
    teacher = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "softmax"], hidden_size=96))
    teacher, metrics = distill(teacher, None, blocks.train, blocks.val, DistillConfig(), _trainer(max_steps=60))
    return teacher.eval()


def test_kd_lowers_validation_loss_and_kd_term(blocks, trained_teacher, tmp_path):
    student = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "linear"]))
    before = perplexity(student, blocks.val)["ppl"]
    student, metrics = distill(student, trained_teacher, blocks.train, blocks.val,
                               DistillConfig(kd_ratio=1.0), _trainer(), workdir=tmp_path, tokenizer=blocks.tokenizer)
    assert metrics["val_ppl"] < 0.5 * before
    curve = metrics["loss_curve"]
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 30 and "val_ppl" in logged[-1]
    # The same metrics as TensorBoard events (accelerate's tracker), readable with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert len(events.Scalars("loss")) == len(logged) and events.Scalars("loss")[-1].step == 30


def test_interrupted_run_resumes_to_the_same_result(blocks, trained_teacher, tmp_path):
    trainer = _trainer(max_steps=8, checkpoint_every=3)
    torch.manual_seed(0)
    ref, ref_metrics = distill(CodexMiniForCausalLM(tiny_config()), trained_teacher, blocks.train, blocks.val,
                               DistillConfig(), trainer, workdir=tmp_path / "a", tokenizer=blocks.tokenizer)

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        distill(CodexMiniForCausalLM(tiny_config()), trained_teacher, blocks.train, blocks.val, DistillConfig(),
                trainer, workdir=tmp_path / "b", tokenizer=blocks.tokenizer, on_step=kill_at_5)
    assert (tmp_path / "b" / "checkpoints" / "step_3" / "state.json").is_file()
    # A different fresh init: everything must come from the checkpoint.
    torch.manual_seed(123)
    resumed, metrics = distill(CodexMiniForCausalLM(tiny_config()), trained_teacher, blocks.train, blocks.val,
                               DistillConfig(), trainer, workdir=tmp_path / "b", tokenizer=blocks.tokenizer)
    assert metrics["resumed_from"] == 3
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert metrics["val_ppl"] == pytest.approx(ref_metrics["val_ppl"], rel=1e-5)


def test_vocabulary_mismatch_is_refused_before_training(blocks):
    student = CodexMiniForCausalLM(tiny_config(vocab_size=300))
    teacher = CodexMiniForCausalLM(tiny_config(vocab_size=200))
    with pytest.raises(ValueError, match="smaller than the student's"):
        distill(student, teacher, blocks.train, blocks.val, DistillConfig(), _trainer(max_steps=1))


def test_bad_trainer_values_are_named(blocks):
    with pytest.raises(ValueError, match="trainer.mixed_precision"):
        distill(CodexMiniForCausalLM(tiny_config()), None, blocks.train, blocks.val, DistillConfig(),
                _trainer(mixed_precision="fp8"))


def test_bf16_autocast_training_runs_and_learns(blocks):
    student = CodexMiniForCausalLM(tiny_config(layer_types=["hybrid", "linear"], feature_map="hedgehog"))
    before = perplexity(student, blocks.val)["ppl"]
    student, metrics = distill(student, None, blocks.train, blocks.val, DistillConfig(),
                               _trainer(mixed_precision="bf16", max_steps=20))
    assert metrics["precision"] == "bf16"
    assert metrics["val_ppl"] < before


def test_bitsandbytes_8bit_adamw_trains(blocks):
    pytest.importorskip("bitsandbytes")
    student = CodexMiniForCausalLM(tiny_config())
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    student, metrics = distill(student, None, blocks.train, blocks.val, DistillConfig(),
                               _trainer(optimizer="adamw_8bit", max_steps=3))
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)
    assert metrics["val_ppl"] < 300


def test_each_training_stage_of_a_run_draws_batches_of_its_own():
    from codexmini.distill.stage import stage_trainer
    from codexmini.train import batch_indices

    t = TrainerConfig(seed=0)
    assert stage_trainer(t, 0) == t  # outside a run: the trainer's own seed
    distill_then_heal = [stage_trainer(t, i).seed for i in (2, 4)]
    first = [set(torch.cat([batch_indices(s, 4096, 4, seed) for s in range(15)]).tolist())
             for seed in distill_then_heal]
    assert len(first[0] & first[1]) < 5  # the heal stage's first 60 blocks are not the distill stage's again
