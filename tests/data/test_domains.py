import copy

import pytest
import torch
import torch.nn.functional as F

from codexmini.data import evaluate_domains, perplexity
from codexmini.data import domains as domains_module
from codexmini.data.corpus import DataBundle


@pytest.fixture
def blocks(tiny_tokenizer):
    g = torch.Generator().manual_seed(0)
    return {"code": torch.randint(0, len(tiny_tokenizer), (5, 12), generator=g),
            "prose": torch.randint(0, len(tiny_tokenizer), (3, 12), generator=g)}


def test_teacher_against_itself_has_zero_kl_and_the_shared_perplexity(gen_teacher, blocks):
    teacher, _ = gen_teacher
    result = evaluate_domains(teacher, blocks, teacher=teacher, batch_size=2)
    assert set(result) == {"code", "prose"}
    for name, b in blocks.items():
        assert result[name]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert result[name]["ppl"] == pytest.approx(perplexity(teacher, b, batch_size=2)["ppl"], rel=1e-5)
        assert result[name]["tokens"] == b[:, 1:].numel()
    assert "kl" not in evaluate_domains(teacher, blocks)["code"]


def test_a_perturbed_student_has_positive_kl_and_a_bundle_works(gen_teacher, blocks):
    teacher, _ = gen_teacher
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers[0].mlp.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bundle = DataBundle(train=blocks["code"], val=blocks["code"], calibration=blocks["code"][:1], tokenizer=None,
                        val_domains=blocks)
    result = evaluate_domains(student, bundle, teacher=teacher)
    assert all(r["kl"] > 1e-4 for r in result.values())
    assert student.training is False and teacher.training is False


def test_kl_in_chunks_equals_the_direct_sum(monkeypatch):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 7, 50, generator=g), torch.randn(2, 7, 50, generator=g)
    direct = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum").item()
    monkeypatch.setattr(domains_module, "_KL_CHUNK_ELEMENTS", 150)  # 3 rows at a time
    assert domains_module.kl_sum(t, s) == pytest.approx(direct, rel=1e-5)
