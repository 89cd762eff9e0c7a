"""RMSNorm: Llama's, in fp32 whatever the input dtype."""

import torch

from codexmini.ops.norm import rms_norm


def test_rms_norm_matches_llamas():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(24))
    x = torch.randn(2, 5, 24) * 7
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, ref.weight, 1e-5), ref(x))
        torch.testing.assert_close(rms_norm(x.bfloat16(), ref.weight.bfloat16(), 1e-5),
                                   ref.to(torch.bfloat16)(x.bfloat16()))


def test_rows_come_out_with_unit_rms_times_the_weight():
    x = torch.randn(4, 64) * torch.logspace(-1, 3, 4)[:, None]  # mean squares far above eps
    y = rms_norm(x, torch.ones(64), 1e-6)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), atol=1e-3, rtol=1e-3)
    w = torch.randn(64)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), y * w)
