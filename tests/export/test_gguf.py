import pytest
import torch
from gguf import GGUFReader

from codexmini import CodexMiniForCausalLM
from codexmini.export.gguf import write_llama_gguf
from codexmini.models.teacher import load_teacher
from tests.conftest import tiny_config


def test_codexmini_softmax_student_round_trips_through_gguf(tmp_path, tiny_tokenizer):
    student = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "softmax"], vocab_size=len(tiny_tokenizer)))
    path = write_llama_gguf(student, tiny_tokenizer, tmp_path / "student.gguf")
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight"}
    llama, _ = load_teacher(path)
    ids = torch.randint(4, len(tiny_tokenizer), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)


def test_gguf_refuses_linear_layers(tmp_path, tiny_tokenizer):
    student = CodexMiniForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="all-softmax"):
        write_llama_gguf(student, tiny_tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
