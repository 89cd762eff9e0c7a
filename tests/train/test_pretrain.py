import torch

from codexmini.data import DataConfig, build_data, perplexity
from codexmini.train import tiny_random_teacher
from tests.conftest import CODE


def test_tiny_random_teacher_pretrains_with_cross_entropy(tmp_path):
    from transformers import LlamaForCausalLM

    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text((CODE.replace("Stack", f"Stack{i}") + "\n") * 4)
    data = DataConfig(source=str(tmp_path), file_glob="*.txt", block_size=32, val_fraction=0.3, max_val_blocks=4)
    kw = dict(data=data, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=64, vocab_size=300)
    raw, tok = tiny_random_teacher(**kw, pretrain_steps=0)
    teacher, tok2 = tiny_random_teacher(**kw, pretrain_steps=30)
    assert isinstance(teacher, LlamaForCausalLM) and teacher.config.num_hidden_layers == 2
    assert teacher.config.vocab_size == len(tok) == len(tok2) <= 300
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    val = build_data(data, tok).val
    assert perplexity(teacher, val)["ppl"] < 0.5 * perplexity(raw, val)["ppl"]
    # Seeded: the same call builds the same teacher.
    again, _ = tiny_random_teacher(**kw, pretrain_steps=30)
    for (name, a), b in zip(teacher.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
