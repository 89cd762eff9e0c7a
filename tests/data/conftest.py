"""Data fixtures: small local corpora in every format, and a tiny random Llama teacher that counts its
`generate` calls (so a test can tell a cache hit from a regeneration)."""

from __future__ import annotations

import json

import pytest
import torch


def write_docs(folder, prefix: str, n: int, lines: int = 30):
    """`n` text files whose every line carries a marker unique to the document (`<prefix>doc<i>`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "".join(f"{prefix}doc{i} says line {j} of {prefix} text\n" for j in range(lines))
        (folder / f"{prefix}{i:02d}.txt").write_text(body)
    return folder


@pytest.fixture
def two_domains(tmp_path):
    """Two folders of distinguishable documents (markers 'alphadoc<i>' / 'betadoc<i>')."""
    return write_docs(tmp_path / "alpha", "alpha", 10), write_docs(tmp_path / "beta", "beta", 10)


@pytest.fixture
def rows():
    return [{"content": f"def f{i}(x):\n    return x * {i}\n" * 20, "id": i} for i in range(6)]


@pytest.fixture
def jsonl_file(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class CountingTeacher:
    """Wraps a model's `generate` to count calls and optionally fail on the n-th (a simulated interruption)."""

    def __init__(self, model):
        self.model, self.calls, self.fail_at = model, 0, None
        self._generate = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self._generate(*args, **kwargs)


@pytest.fixture
def gen_teacher(tiny_tokenizer):
    """A tiny random Llama with large enough weights that greedy decoding does not collapse to one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.1, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return model, CountingTeacher(model)
