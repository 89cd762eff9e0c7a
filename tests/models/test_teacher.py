import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.export.gguf import write_llama_gguf
from codexmini.models.from_teacher import student_from_teacher
from codexmini.models.teacher import load_teacher, resolve_teacher


def test_load_teacher_from_local_folder(tiny_llama_dir):
    model, tok = load_teacher(tiny_llama_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.eos_token_id == 2 and tok.pad_token_id is not None
    assert model.config.model_type == "llama"


def test_load_teacher_from_gguf_matches_original(tiny_llama_dir, tmp_path):
    original, tok = load_teacher(tiny_llama_dir)
    path = write_llama_gguf(original, tok, tmp_path / "tiny.gguf")
    from_gguf, tok2 = load_teacher(path)
    ids = tok("def add(a, b): return a + b", return_tensors="pt").input_ids
    assert torch.equal(ids, tok2("def add(a, b): return a + b", return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    # A GGUF teacher comes back as a plain model: it can be saved and reloaded.
    assert getattr(from_gguf.config, "quantization_config", None) is None
    from_gguf.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_load_teacher_from_codexmini_folder(tmp_path, tiny_tokenizer):
    from tests.conftest import tiny_config

    student = CodexMiniForCausalLM(tiny_config())
    student.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = load_teacher(tmp_path)
    assert isinstance(model, CodexMiniForCausalLM)


def test_teacher_spec_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_teacher(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_teacher(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_teacher(tmp_path, dtype="float8")
    assert resolve_teacher("HuggingFaceTB/SmolLM2-135M").kind == "hub"


def test_hub_teacher_without_network_says_what_to_do():
    with pytest.raises(OSError, match="pass a local folder"):
        load_teacher("codexmini-test/does-not-exist")


def test_bitsandbytes_modes_are_one_vocabulary(tiny_llama_dir):
    from codexmini.models.bnb import BNB_MODES, bnb_config
    from codexmini.quantize import bnb

    assert bnb.BNB_MODES is BNB_MODES and bnb.bnb_config is bnb_config  # one home, shared with the quantize stage
    with pytest.raises(ValueError, match="not one of int8, nf4, fp4"):
        bnb_config("3bit")
    # The old names fail before anything is loaded, and say what to write instead.
    with pytest.raises(ValueError, match="'8bit' is now spelled 'int8'"):
        load_teacher(tiny_llama_dir, quantization="8bit")
    with pytest.raises(ValueError, match="'4bit' is now spelled 'nf4'"):
        load_teacher(tiny_llama_dir, quantization="4bit")


def test_student_with_all_layers_softmax_equals_teacher(tiny_llama_dir):
    teacher, tok = load_teacher(tiny_llama_dir)
    student = student_from_teacher(teacher)
    ids = torch.randint(4, len(tok), (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)


def test_student_subset_and_linearized_layers_keep_qkvo(tiny_llama_dir, tmp_path):
    teacher, _ = load_teacher(tiny_llama_dir)
    student = student_from_teacher(teacher, layers=[0, 3], layer_types=["hybrid", "linear"],
                                   feature_map="hedgehog", sliding_window=4)
    assert student.config.num_hidden_layers == 2
    assert student.config.layer_types == ["hybrid", "linear"]
    for dst, src in ((0, 0), (1, 3)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(student.model.layers[dst].self_attn, name).weight,
                               getattr(teacher.model.layers[src].self_attn, name).weight)
        assert torch.equal(student.model.layers[dst].mlp.down_proj.weight, teacher.model.layers[src].mlp.down_proj.weight)
    student.save_pretrained(tmp_path)
    reloaded = CodexMiniForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.layer_types == ["hybrid", "linear"]


def test_student_from_teacher_rejects_bad_layer_indices(tiny_llama_dir):
    teacher, _ = load_teacher(tiny_llama_dir)
    with pytest.raises(ValueError, match="teacher has 4 layers"):
        student_from_teacher(teacher, layers=[0, 9])


@pytest.mark.parametrize("mode, module", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit"), ("fp4", "Linear4bit")])
def test_bitsandbytes_teacher_loads_quantized_and_stays_close(tiny_llama_dir, mode, module):
    pytest.importorskip("bitsandbytes")
    ref, tok = load_teacher(tiny_llama_dir)
    model, _ = load_teacher(tiny_llama_dir, quantization=mode)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == module
    ids = torch.randint(4, len(tok), (1, 12))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), model(ids).logits.float()
    # Same function up to quantization error: the logits stay strongly correlated.
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.95, cos
