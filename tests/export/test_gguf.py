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


def test_llama_cpp_decodes_the_same_greedy_tokens_as_the_runtime(tmp_path, tiny_tokenizer):
    """The GGUF in llama.cpp (optional `llama-cpp-python`) and the .cmx in codexmini's runtime: same greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from codexmini.export.to_cmx import export_cmx
    from codexmini.runtime import Runtime, SamplingConfig
    from codexmini.runtime.sampling import stream_tokens

    torch.manual_seed(1)
    student = CodexMiniForCausalLM(tiny_config(layer_types=["softmax", "softmax"], vocab_size=len(tiny_tokenizer)))
    gguf_path = write_llama_gguf(student, tiny_tokenizer, tmp_path / "student.gguf")
    rt = Runtime(export_cmx(student, tiny_tokenizer, tmp_path / "student.cmx"))
    prompt = torch.randint(4, len(tiny_tokenizer), (12,), generator=torch.Generator().manual_seed(2)).tolist()
    want = list(stream_tokens(rt, prompt, SamplingConfig(max_tokens=24, stop_at_eos=False)))

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=64, n_threads=2, verbose=False)
    n_vocab = llm.n_vocab()
    got, feed = [], prompt
    for _ in range(24):
        llm.eval(feed)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
        got.append(tok)
        feed = [tok]
    assert got == want
