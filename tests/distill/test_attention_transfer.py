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
