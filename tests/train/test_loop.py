import math

import pytest
import torch
from torch import nn

from codexmini.train import Hooks, fit, next_token_loss
from tests.train.conftest import tiny_model, trainer


class Killed(Exception):
    pass


def _kill_at(n):
    def on_step(step):
        if step == n:
            raise Killed
    return on_step


def test_next_token_loss_goes_down_and_validation_improves(blocks):
    model = tiny_model()
    model, metrics = fit(model, next_token_loss, blocks, blocks[:4], trainer(max_steps=40, lr=1e-2))
    curve = metrics["loss_curve"]
    assert len(curve) == 40 and sum(curve[-3:]) / 3 < 0.5 * sum(curve[:3]) / 3
    assert metrics["val_ppl"] < 5 and metrics["val_loss"] == pytest.approx(math.log(metrics["val_ppl"]))
    assert metrics["steps"] == 40 and metrics["resumed_from"] == 0 and metrics["train_tokens"] == 40 * 4 * 16
    assert not model.training


def test_seeded_runs_are_identical(blocks):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, metrics = fit(tiny_model(), next_token_loss, blocks, blocks[:2], trainer(max_steps=4, grad_accum=2))
        runs.append((model.state_dict(), metrics["loss_curve"]))
    assert runs[0][1] == runs[1][1]
    for name, a in runs[0][0].items():
        assert torch.equal(a, runs[1][0][name]), name


class _Scale(nn.Module):
    """An extra trained module: a learnable temperature on the logits."""

    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))

    def forward(self, logits):
        return logits * self.log_t.exp()


def _scaled_run(blocks, workdir, on_step=None):
    """A loss using an extra module and a counter kept in checkpoints: what a stage's hooks look like."""
    counter = {"micro_batches": 0}

    def loss(ctx, batch):
        counter["micro_batches"] += 1
        logits = ctx.modules["scale"](ctx.model(input_ids=batch.ids).logits)
        ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
        return {"loss": ce, "t": ctx.modules["scale"].log_t.detach().exp()}

    hooks = Hooks(modules={"scale": _Scale()}, state=lambda: dict(counter), load_state=counter.update,
                  on_step=on_step)
    model, metrics = fit(tiny_model(), loss, blocks, blocks[:2], trainer(max_steps=8, checkpoint_every=3),
                         workdir=workdir, hooks=hooks)
    return model, metrics, hooks.modules["scale"], counter


def test_killed_run_resumes_bit_for_bit(blocks, tmp_path):
    torch.manual_seed(0)
    ref, ref_metrics, ref_scale, ref_counter = _scaled_run(blocks, tmp_path / "a")
    torch.manual_seed(0)
    with pytest.raises(Killed):
        _scaled_run(blocks, tmp_path / "b", on_step=_kill_at(5))
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_3"]
    torch.manual_seed(123)  # a different fresh init: everything must come from the checkpoint
    resumed, metrics, scale, counter = _scaled_run(blocks, tmp_path / "b")
    assert metrics["resumed_from"] == 3
    for name, a in ref.state_dict().items():
        assert torch.equal(a, resumed.state_dict()[name]), name
    assert torch.equal(ref_scale.log_t, scale.log_t) and ref_scale.log_t.item() != 0  # the extra module trained
    assert metrics["val_loss"] == ref_metrics["val_loss"]
    assert metrics["loss_curve"] == ref_metrics["loss_curve"][3:]
    assert counter == ref_counter == {"micro_batches": 8}  # stage state came back from the checkpoint
    # Both runs log every step; the resumed log continues the interrupted one without repeating a step.
    steps = [line.split(",")[0] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [f'{{"step": {s}' for s in [1, 2, 3, 4, 5, 6, 7, 8]]


def test_batch_hook_rewrites_micro_batches_and_counts_tokens(blocks):
    seen = []

    def half(ctx, batch):
        return type(batch)(ids=batch.ids[:, :8], labels=batch.labels[:, :8], index=batch.index, step=batch.step,
                           micro=batch.micro)

    def loss(ctx, batch):
        seen.append((batch.step, batch.micro, tuple(batch.ids.shape)))
        return next_token_loss(ctx, batch)

    _, metrics = fit(tiny_model(), loss, blocks, None, trainer(max_steps=2, grad_accum=2), hooks=Hooks(batch=half))
    assert seen == [(0, 0, (2, 8)), (0, 1, (2, 8)), (1, 0, (2, 8)), (1, 1, (2, 8))]
    assert metrics["train_tokens"] == 2 * 4 * 8 and "val_ppl" not in metrics


def test_gradient_checkpointing_needs_a_transformers_model(blocks):
    with pytest.raises(ValueError, match="trainer.gradient_checkpointing"):
        fit(nn.Linear(2, 2), next_token_loss, blocks, None, trainer(gradient_checkpointing=True))
