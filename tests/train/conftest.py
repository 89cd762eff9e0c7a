"""Tiny seeded pieces for the trainer's tests: a 2-layer model and token blocks it can learn in a few steps."""

import pytest
import torch

from codexmini.train import TrainerConfig


def counting_blocks(n: int = 16, length: int = 16, vocab: int = 60) -> torch.Tensor:
    """`[n, length]` blocks where each token is the previous one + 3 (mod 50): a bigram rule learnt in seconds."""
    start = torch.arange(n)[:, None] * 7
    return 4 + (start + 3 * torch.arange(length)[None]) % (vocab - 10)


def tiny_model():
    from codexmini import CodexMiniForCausalLM
    from tests.conftest import tiny_config

    return CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "linear"]))


def trainer(**overrides) -> TrainerConfig:
    fields = dict(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=1000, checkpoint_every=1000,
                  log_every=1, mixed_precision="no", log_with="none")
    fields.update(overrides)
    return TrainerConfig(**fields)


@pytest.fixture
def blocks():
    return counting_blocks()
