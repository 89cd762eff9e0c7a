"""Shared tiny fixtures: seeded, local, no network. A tiny model trains in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session):
    """Build (or load from its cache) the runtime's CPU kernels once, before any test is timed: on a fresh machine
    the first build takes about a minute, which must not land inside a test with a time limit."""
    from codexmini.runtime import native

    native.load()


CODE = '''def add(a, b):
    """Add two numbers."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, x):
        self.items.append(x)

    def pop(self):
        return self.items.pop()
'''


def tiny_config(**overrides):
    """The seeded tiny student: 2 layers (one softmax, one linear), hidden 64, 4 heads, 2 KV heads."""
    from codexmini import CodexMiniConfig

    fields = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, layer_types=["softmax", "linear"],
                  max_position_embeddings=512, sliding_window=8, linear_chunk_size=8, bos_token_id=1,
                  eos_token_id=2, pad_token_id=3)
    fields.update(overrides)
    return CodexMiniConfig(**fields)


def perturb_linear_parts(module):
    """Move feature-map weights and decays off their initial values (identity maps, fixed decays), so parity tests
    see non-trivial ones; in place, returns `module`."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "feature_map" in name or "decay" in name:
                p.add_(0.3 * torch.randn_like(p))
    return module


def seeded_model(**overrides):
    """The tiny student (`tiny_config(**overrides)`) built under seed 0, in eval mode, its weights as initialised."""
    from codexmini import CodexMiniForCausalLM

    torch.manual_seed(0)
    return CodexMiniForCausalLM(tiny_config(**overrides)).eval()


def tiny_model(**overrides):
    """The seeded tiny student (`seeded_model(**overrides)`) with non-trivial linear-attention parts."""
    return perturb_linear_parts(seeded_model(**overrides))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from codexmini.data import train_bpe_tokenizer

    return train_bpe_tokenizer([CODE * 3, "hello world, the quick brown fox"] * 10, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama teacher saved with save_pretrained (what a hub download would give)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_corpus(tmp_path):
    """A folder of small local text files."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text((CODE.replace("add", f"add{i}") + "\n") * 4)
    return folder
