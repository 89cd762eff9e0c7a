import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.prune import block_influence, select_layers
from tests.conftest import tiny_config


def test_an_identity_layer_has_zero_influence_and_is_dropped_first():
    model = CodexMiniForCausalLM(tiny_config(num_hidden_layers=4, layer_types=["softmax"] * 4)).eval()
    with torch.no_grad():
        # Zeroing a block's output projections makes it the identity on the residual stream.
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    calib = torch.randint(4, 300, (4, 16))
    scores = block_influence(model, calib[:, :], batch_size=3)
    assert len(scores) == 4
    assert abs(scores[2]) < 1e-6 and min(scores[:2]) > 1e-4
    assert select_layers(model, calib, keep=3) == [0, 1, 3]


def test_keep_count_is_checked():
    model = CodexMiniForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="cannot keep 3 of 2 layers"):
        select_layers(model, torch.randint(4, 300, (1, 8)), keep=3)
