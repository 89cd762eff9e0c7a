"""Student initialisation paths and the pipeline's file helpers."""

import json

import pytest
import torch

from codexmini import CodexMiniForCausalLM
from codexmini.config import compose
from codexmini.pipeline import build_student, read_manifest, save_model_folder, write_atomic
from tests.conftest import tiny_config


def test_scratch_student_uses_the_tokenizer_and_schema(tiny_tokenizer):
    cfg = compose("tiny_smoke", ["model=scratch_small", "model.hidden_size=32", "model.intermediate_size=48",
                                 "model.num_attention_heads=2", "model.num_key_value_heads=1"])
    student = build_student(cfg, None, tiny_tokenizer)
    assert student.config.vocab_size == len(tiny_tokenizer)
    assert student.config.layer_types == ["softmax", "linear", "softmax", "hybrid"]
    assert student.config.eos_token_id == tiny_tokenizer.eos_token_id


def test_folder_student_and_its_errors(tmp_path, tiny_tokenizer):
    CodexMiniForCausalLM(tiny_config()).save_pretrained(tmp_path / "m")
    cfg = compose("tiny_smoke", ["model.init=folder", f"model.path={tmp_path / 'm'}"])
    assert isinstance(build_student(cfg, None, tiny_tokenizer), CodexMiniForCausalLM)
    cfg = compose("tiny_smoke", ["model.init=folder", f"model.path={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="model.path"):
        build_student(cfg, None, tiny_tokenizer)
    cfg = compose("tiny_smoke", ["model.keep_layers=2"])
    with pytest.raises(ValueError, match="model.layers or model.keep_layers"):
        build_student(cfg, None, tiny_tokenizer, torch.zeros(1, 4, dtype=torch.long))


def test_saved_folder_is_hashed_and_manifest_reads_back(tmp_path, tiny_tokenizer):
    hashes = save_model_folder(CodexMiniForCausalLM(tiny_config()), tiny_tokenizer, tmp_path / "stage")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(hashes)
    assert not [p for p in (tmp_path / "stage").iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert read_manifest(tmp_path / "stage") is None
    write_atomic(tmp_path / "stage" / "manifest.json", json.dumps({"key": "k"}))
    assert read_manifest(tmp_path / "stage") == {"key": "k"}


def test_saved_files_get_the_usual_permissions(tmp_path, tiny_tokenizer):
    import os

    old = os.umask(0o022)
    try:
        save_model_folder(CodexMiniForCausalLM(tiny_config()), tiny_tokenizer, tmp_path / "stage")
        write_atomic(tmp_path / "stage" / "manifest.json", "{}")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "manifest.json"):
        assert (tmp_path / "stage" / name).stat().st_mode & 0o777 == 0o644, name
