import importlib.util

import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.distill.attention_transfer import TransferConfig, attention_transfer, transfer_error
from tests.conftest import tiny_config


@pytest.mark.parametrize("layer_type", ["linear", "hybrid"])
def test_attention_transfer_drives_layer_error_down(layer_type, tiny_tokenizer):
    from tests.conftest import CODE

    student = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", layer_type], feature_map="hedgehog",
                                               sliding_window=4))
    with torch.no_grad():  # peaked attention, as in a trained model (random init attends almost uniformly)
        for name in ("q_proj", "k_proj"):
            getattr(student.model.layers[1].self_attn, name).weight.normal_(0, 0.5)
    ids = torch.tensor(tiny_tokenizer(CODE * 4)["input_ids"])
    blocks = ids[: len(ids) // 24 * 24].reshape(-1, 24)[:8]
    frozen = {n: p.clone() for n, p in student.named_parameters() if "feature_map" not in n}
    # Measured on the blocks it trains on: the layer learns to imitate softmax attention on this text.
    student, metrics = attention_transfer(student, blocks, blocks, TransferConfig(steps=60, lr=2e-2))
    before, after = metrics["transfer_mse_before"][1], metrics["transfer_mse_after"][1]
    assert after < 0.7 * before
    assert transfer_error(student, blocks)[1] == pytest.approx(after)
    # train=feature_maps leaves every other weight untouched and gradients switched back on.
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        assert p.requires_grad


def test_feature_maps_mode_needs_learnable_maps():
    student = CodexMiniForCausalLM(tiny_config(feature_map="elu"))
    with pytest.raises(ValueError, match="no learnable feature map"):
        attention_transfer(student, torch.randint(4, 300, (4, 8)), torch.randint(4, 300, (2, 8)), TransferConfig())
    _, metrics = attention_transfer(student, torch.randint(4, 300, (4, 8)), torch.randint(4, 300, (2, 8)),
                                    TransferConfig(steps=2, train="attention"))
    assert metrics["transfer_layers"] == [1]


def _peaked_student():
    student = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "hybrid"], feature_map="hedgehog",
                                               sliding_window=4))
    with torch.no_grad():
        for name in ("q_proj", "k_proj"):
            getattr(student.model.layers[1].self_attn, name).weight.normal_(0, 0.5)
    return student


def test_attention_transfer_logs_checkpoints_and_resumes_with_a_workdir(tiny_tokenizer, tmp_path):
    import json

    from codexmini.train import TrainerConfig
    from tests.conftest import CODE

    ids = torch.tensor(tiny_tokenizer(CODE * 4)["input_ids"])
    blocks = ids[: len(ids) // 24 * 24].reshape(-1, 24)[:8]
    cfg = TransferConfig(steps=10, lr=2e-2)
    # steps, batch_size, lr and seed come from TransferConfig; the rest from the trainer.
    trainer = TrainerConfig(max_steps=999, lr=1.0, warmup_steps=0, checkpoint_every=4, eval_every=5, log_every=2,
                            mixed_precision="no", log_with="tensorboard")
    torch.manual_seed(0)
    student, metrics = attention_transfer(_peaked_student(), blocks, blocks, cfg, workdir=tmp_path, trainer=trainer)
    assert metrics["steps"] == 10 and metrics["resumed_from"] == 0 and len(metrics["loss_curve"]) == 10
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 5, 6, 8, 10]
    assert "mse_layer1" in logged[0] and logged[-1]["val_mse"] == pytest.approx(metrics["transfer_mse_after"][1])
    assert metrics["transfer_mse_after"][1] < metrics["transfer_mse_before"][1]
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_8"]
    # The same call again finds step 8 and does the last two steps: the same weights as the run that did all ten.
    torch.manual_seed(0)
    again, resumed = attention_transfer(_peaked_student(), blocks, blocks, cfg, workdir=tmp_path, trainer=trainer)
    assert resumed["resumed_from"] == 8 and len(resumed["loss_curve"]) == 2
    for (name, a), b in zip(student.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in again.parameters())
