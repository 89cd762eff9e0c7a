"""Shared pieces of the hardening tests (issue 16): a tiny run that takes seconds, finished once per session and
copied by tests that damage it, and a tiny `.cmx` file built once."""

from __future__ import annotations

import shutil

import pytest
import torch

from codexmini.cli import main

# tiny_smoke cut down to seconds: an untrained tiny teacher, one distill stage of two steps.
TINY_STAGES = ["stages=[{stage: distill}]", "trainer.max_steps=2"]
TINY = ["teacher.pretrain_steps=0", *TINY_STAGES]


def run_cli(*args: str) -> int:
    return main([*args])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished tiny run: (output_dir, run folder). Tests that change it use `tiny_run` (a copy)."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", "tiny_smoke", f"output_dir={out}", *TINY]) == 0
    return out, out / "tiny_smoke" / "default"


@pytest.fixture
def tiny_run(finished_run, tmp_path):
    """A private copy of the finished tiny run: (output_dir, run folder)."""
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out, symlinks=True)
    return out, out / "tiny_smoke" / "default"


@pytest.fixture(scope="session")
def tiny_cmx(tmp_path_factory, tiny_tokenizer):
    """A tiny `.cmx` file covering every part of the format: softmax, linear and hybrid layers (hedgehog feature
    maps with decay), int4 and int8 layers, an int8 head untied from the float embedding."""
    from codexmini import CodexMiniForCausalLM
    from codexmini.export.to_cmx import export_cmx
    from codexmini.quantize import QuantizeConfig, quantize_model
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=3, layer_types=["softmax", "linear", "hybrid"], feature_map="hedgehog",
                         linear_decay=True, vocab_size=len(tiny_tokenizer))
    model = CodexMiniForCausalLM(config).eval()
    cfg = QuantizeConfig(method="rtn", default="int4_g32", rules=[{"pattern": "^lm_head$", "scheme": "int8"},
                                                                   {"pattern": "down_proj", "scheme": "int8"}],
                         untie_head=True)
    model, _ = quantize_model(model, cfg)
    return export_cmx(model, tiny_tokenizer, tmp_path_factory.mktemp("cmx") / "tiny.cmx")
