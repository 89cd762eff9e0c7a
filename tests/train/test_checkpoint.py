import json

import pytest
import torch

from codexmini.train import Hooks, checkpoint_problem, fit, latest_checkpoint, next_token_loss
from codexmini.train.checkpoint import save_checkpoint
from tests.train.conftest import tiny_model, trainer


class Killed(Exception):
    pass


def _run(blocks, workdir, kill_at=None):
    def on_step(step):
        if step == kill_at:
            raise Killed

    torch.manual_seed(0)
    return fit(tiny_model(), next_token_loss, blocks, blocks[:2], trainer(max_steps=8, checkpoint_every=2),
               workdir=workdir, hooks=Hooks(on_step=on_step))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(blocks, tmp_path, damage):
    ref, ref_metrics = _run(blocks, tmp_path / "a")
    with pytest.raises(Killed):
        _run(blocks, tmp_path / "b", kill_at=7)
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_4", "step_6"]  # keep_checkpoints=2
    weights = ckpts / "step_6" / "model.safetensors"
    if damage == "truncate":  # a copy cut short, a full disk
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":  # same size, different bytes
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (ckpts / "step_6" / "state.json").unlink()
    assert checkpoint_problem(ckpts / "step_6") is not None and checkpoint_problem(ckpts / "step_4") is None
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_6"):
        assert latest_checkpoint(ckpts) == ckpts / "step_4"
    with pytest.warns(UserWarning, match="step_6"):
        resumed, metrics = _run(blocks, tmp_path / "b")
    assert metrics["resumed_from"] == 4
    for name, a in ref.state_dict().items():
        assert torch.equal(a, resumed.state_dict()[name]), name
    assert metrics["val_loss"] == ref_metrics["val_loss"]


def test_checkpoint_records_every_file_and_keeps_the_newest(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, keep=2, modules={"head": torch.nn.Linear(2, 1)},
                        state={"seen": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
    meta = json.loads((tmp_path / "step_3" / "state.json").read_text())
    assert meta["step"] == 3 and meta["state"] == {"seen": 3}
    assert set(meta["files"]) == {"model.safetensors", "head.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"}
    (tmp_path / "step_3" / "head.safetensors").unlink()
    assert "head.safetensors is missing" in checkpoint_problem(tmp_path / "step_3")
    with pytest.raises(ValueError, match="extra module names"):
        save_checkpoint(tmp_path, 4, model, opt, sched, modules={"model": torch.nn.Linear(2, 1)})


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "step_5").mkdir()  # a folder whose save never finished
    with pytest.warns(UserWarning, match="no state.json"):
        assert latest_checkpoint(tmp_path) is None
