"""The feature-map functions: their kernels, widths and signs."""

import pytest
import torch

from codexmini.ops.feature_maps import (elu_feature_map, feature_map, feature_map_dim, hedgehog_feature_map,
                                        relu_feature_map, taylor_feature_map)
from codexmini.ops.names import FEATURE_MAPS


def test_taylor_kernel_is_the_second_order_expansion_of_exp():
    d = 8
    q, k = torch.randn(2, 3, 5, d), torch.randn(2, 3, 5, d)
    got = (taylor_feature_map(q) * taylor_feature_map(k)).sum(-1)
    x = (q * k).sum(-1) / d ** 0.5
    torch.testing.assert_close(got, 1 + x + x ** 2 / 2, atol=1e-5, rtol=1e-5)


def test_hedgehog_is_two_softmaxes_of_a_per_head_projection():
    x, w = torch.randn(2, 3, 5, 4), torch.randn(3, 4, 6)
    proj = torch.einsum("bhtd,hdf->bhtf", x, w)
    torch.testing.assert_close(hedgehog_feature_map(x, w), torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1))
    # the runtime's unbatched [H, T, D] layout gives the same rows
    torch.testing.assert_close(hedgehog_feature_map(x[1], w), hedgehog_feature_map(x, w)[1])
    # bf16 in, bf16 out (the softmax itself runs in fp32)
    assert hedgehog_feature_map(x.bfloat16(), w).dtype == torch.bfloat16


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_every_map_has_the_width_it_declares_and_a_positive_kernel(name):
    H, D, Fh = 3, 8, 5
    x, y = torch.randn(2, H, 7, D) * 3, torch.randn(2, H, 7, D) * 3
    w = torch.randn(H, D, Fh) if name == "hedgehog" else None
    fx, fy = feature_map(name, x, w), feature_map(name, y, w)
    assert fx.shape == (2, H, 7, feature_map_dim(name, D, Fh))
    assert ((fx * fy).sum(-1) >= 0).all()


def test_fixed_maps():
    x = torch.randn(4, 9)
    torch.testing.assert_close(elu_feature_map(x), torch.nn.functional.elu(x) + 1)
    assert (elu_feature_map(x) > 0).all()
    torch.testing.assert_close(relu_feature_map(x), x.clamp(min=0))


def test_unknown_names_and_a_missing_hedgehog_weight_are_refused():
    with pytest.raises(ValueError, match="elu, relu, hedgehog, taylor"):
        feature_map("cosine", torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match="elu, relu, hedgehog, taylor"):
        feature_map_dim("cosine", 4)
    with pytest.raises(ValueError, match="needs its weight"):
        feature_map("hedgehog", torch.zeros(1, 1, 1, 2))
