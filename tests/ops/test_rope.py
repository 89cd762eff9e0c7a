"""RoPE tables and rotation: Llama's, relative, norm-preserving."""

import torch

from codexmini.ops.rope import apply_rope, rotary_cos_sin


def test_rope_matches_llamas_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, H, T, D = 2, 3, 7, 16
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    pos = torch.arange(3, 3 + T)[None].expand(B, T)
    cos, sin = rotary_cos_sin(pos, D, 10000.0)
    assert cos.shape == sin.shape == (B, T, D)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos[:, None], sin[:, None]), want_q)
    torch.testing.assert_close(apply_rope(k, cos[:, None], sin[:, None]), want_k)
    # the tables themselves: angle position * theta^(-2i/D), the half repeated
    inv = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
    torch.testing.assert_close(cos[0, 1], torch.cat([(4 * inv).cos(), (4 * inv).cos()]))


def test_rotation_preserves_norms_and_scores_depend_on_the_offset_only():
    D = 32
    q, k = torch.randn(D), torch.randn(D)

    def at(x, p):
        cos, sin = rotary_cos_sin(torch.tensor([p]), D, 500.0)
        return apply_rope(x[None], cos, sin)[0]

    torch.testing.assert_close(at(q, 17).norm(), q.norm())
    torch.testing.assert_close(at(q, 9) @ at(k, 4), at(q, 105) @ at(k, 100), atol=1e-4, rtol=1e-4)


def test_unbatched_positions_give_the_runtimes_layout():
    """The runtime passes positions `[T]` and heads `[H, T, D]`: the same numbers as the batched call."""
    D, T = 8, 5
    x = torch.randn(3, T, D)
    cos, sin = rotary_cos_sin(torch.arange(T), D, 10000.0)
    cb, sb = rotary_cos_sin(torch.arange(T)[None], D, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), apply_rope(x[None], cb[:, None], sb[:, None])[0])
    assert rotary_cos_sin(torch.arange(T), D, 10000.0, torch.bfloat16)[0].dtype == torch.bfloat16
