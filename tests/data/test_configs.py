"""The shipped data options fit the schema and pass the checks; eval_domains trains on what data=stdlib does."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from codexmini.data import DataConfig, build_data, check_data_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "codexmini" / "configs" / "data").glob("*.yaml"))


def _load(path) -> DataConfig:
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path))
    return DataConfig(**OmegaConf.to_container(merged))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_data_option_passes_the_checks(path):
    check_data_config(_load(path))


def test_eval_domains_trains_on_the_stdlib_blocks_of_data_stdlib(tiny_tokenizer):
    stdlib = _load(CONFIGS[0].with_name("stdlib.yaml"))
    stdlib.max_files = 20
    evals = _load(CONFIGS[0].with_name("eval_domains.yaml"))
    evals.sources = [s for s in evals.sources if s.name in ("stdlib", "licences")]
    evals.sources[0].max_files, evals.sources[1].max_files = 20, 10
    a, b = build_data(stdlib, tiny_tokenizer), build_data(evals, tiny_tokenizer)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val_domains["stdlib"])
    assert torch.equal(a.calibration, b.calibration)
