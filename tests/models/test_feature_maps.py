import torch

from codexmini.models.feature_maps import (EluFeatureMap, HedgehogFeatureMap, ReluFeatureMap, TaylorFeatureMap,
                                           build_feature_map)


def test_taylor_kernel_is_second_order_expansion_of_exp():
    d = 8
    fm = TaylorFeatureMap(d)
    q, k = torch.randn(2, 3, 5, d), torch.randn(2, 3, 5, d)
    got = (fm(q) * fm(k)).sum(-1)
    x = (q * k).sum(-1) / d ** 0.5
    torch.testing.assert_close(got, 1 + x + x ** 2 / 2, atol=1e-5, rtol=1e-5)
    assert fm(q).shape[-1] == fm.out_dim(d) == 1 + d + d * (d + 1) // 2


def test_fixed_maps_are_non_negative():
    x = torch.randn(2, 2, 7, 16) * 3
    assert (EluFeatureMap()(x) > 0).all()
    assert (ReluFeatureMap()(x) >= 0).all()


def test_hedgehog_starts_at_identity_and_is_learnable():
    fm = HedgehogFeatureMap(num_heads=3, head_dim=4, feature_dim=4)
    x = torch.randn(1, 3, 5, 4)
    out = fm(x)
    torch.testing.assert_close(out[..., :4], x.softmax(-1))
    torch.testing.assert_close(out[..., 4:], (-x).softmax(-1))
    out.sum().backward()
    assert fm.weight.grad is not None and fm.weight.requires_grad


def test_unknown_feature_map_names_the_choices():
    try:
        build_feature_map("cosine", 2, 4, 4)
    except ValueError as err:
        assert "elu, relu, hedgehog, taylor" in str(err)
    else:
        raise AssertionError("expected ValueError")
