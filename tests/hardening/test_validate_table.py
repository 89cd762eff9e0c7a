"""Issue 16, item 7: `codexmini validate` catches every bad value before any work, one line naming the key.

A table holds bad values for every schema field with a range or a set of allowed values, over every section a
run config has (`codexmini.config.groups()`: the run's own sections and every registered stage's), and a
coverage test makes sure no such field is left out of it: a new field needs a row here, or a line in NO_RANGE
saying why it has none. The same values are refused inside a recipe's per-stage `overrides`, and Hydra's `+key`,
which adds a key past the schema, is refused naming the key.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from codexmini.config import RunBase, compose, groups
from codexmini.pipeline import validate
from tests.hardening.conftest import TINY, run_cli

NAN, INF = math.nan, math.inf
SCRATCH = {"model.init": "scratch", "model.layer_types": None}  # a scratch student of the schema's 4 layers

# key: bad values (plain Python values, set on the composed tiny_smoke config). Some need other keys set to
# matter: ("key", value, {other: value}).
TABLE: dict[str, list] = {
    "recipe": ["a/b", "..", ""],
    "run_name": ["../../escape", "a/b", ".hidden", ""],
    "seed": [-1],
    # model (tiny_smoke builds a 3-layer student from a 4-layer teacher)
    "model.init": ["bogus"],
    "model.path": [("/nonexistent/folder", {"model.init": "folder"})],
    "model.layers": [[0, 9], [-1, 0, 1], [0, 0, 1], []],
    "model.keep_layers": [0, (9, {"model.layers": None})],
    "model.layer_types": [["softmax", "bogus", "hybrid"], ["softmax"]],
    "model.feature_map": ["bogus"],
    "model.sliding_window": [0, -1],
    "model.linear_chunk_size": [0],
    "model.hidden_size": [0],
    "model.num_hidden_layers": [0, (3, {"model.init": "scratch", "model.layer_types": ["softmax", "linear"]})],
    "model.num_attention_heads": [0, (3, {**SCRATCH, "model.hidden_size": 64})],
    "model.num_key_value_heads": [0, (3, {**SCRATCH, "model.num_attention_heads": 4})],
    "model.intermediate_size": [0],
    "model.head_dim": [0, 15],
    "model.embedding_rank": [0, (64, {**SCRATCH, "model.hidden_size": 64})],
    # trainer
    "trainer.max_steps": [0, -1],
    "trainer.batch_size": [0],
    "trainer.grad_accum": [0],
    "trainer.lr": [NAN, -1.0, 0.0, INF],
    "trainer.warmup_steps": [-5],
    "trainer.weight_decay": [-0.1, NAN],
    "trainer.max_grad_norm": [-1.0, NAN],
    "trainer.mixed_precision": ["fp8"],
    "trainer.optimizer": ["sgd"],
    "trainer.eval_every": [0],
    "trainer.eval_blocks": [0],
    "trainer.checkpoint_every": [0],
    "trainer.keep_checkpoints": [0],
    "trainer.log_every": [0],
    "trainer.seed": [-1],
    "trainer.log_with": ["bogus"],
    # generate
    "generate.prompt": [""],
    "generate.max_new_tokens": [-1, 0],
    # distill
    "distill.loss": ["bogus"],
    "distill.temperature": [0.0, -1.0, NAN, INF],
    "distill.kd_ratio": [1.5, -0.1, NAN],
    "distill.beta": [2.0, NAN],
    "distill.alpha": [-1.0],
    "distill.chunk_size": [0],
    "distill.hidden_weight": [-1.0, NAN],
    "distill.hidden_loss": ["bogus"],
    "distill.hidden_student_layers": [[-1], [0, 0]],
    "distill.hidden_teacher_layers": [[-1]],
    "distill.on_policy_fraction": [1.5],
    "distill.on_policy_prompt_tokens": [0, (64, {"distill.on_policy_fraction": 0.5})],
    "distill.on_policy_new_tokens": [0],
    "distill.on_policy_temperature": [0.0],
    "distill.sequence_level_fraction": [1.5, NAN, (0.6, {"distill.on_policy_fraction": 0.5})],
    "distill.sequence_level_temperature": [-1.0, NAN],
    "distill.teacher_cache": [""],
    "distill.teacher_cache_mode": ["bogus"],
    "distill.teacher_top_k": [0],
    # transfer
    "transfer.steps": [-1],
    "transfer.batch_size": [0],
    "transfer.lr": [0.0, NAN, INF],
    "transfer.train": ["bogus"],
    "transfer.seed": [-1],
    # prune (tiny_smoke's: heads + MLP channels of a 3-layer student)
    "prune.criterion": ["bogus"],
    "prune.norm": [3],
    "prune.heads": [1.0, -0.1, NAN, 0.9],
    "prune.mlp": [1.5],
    "prune.hidden": [1.0],
    "prune.param_budget": [1.0, -0.5, (0.5, {"prune.mlp": 0.25})],
    "prune.budget_dims": [["bogus"], []],
    "prune.head_mode": ["bogus"],
    "prune.round_to": [0],
    "prune.drop_layers": [-1, 3],
    "prune.depth_method": ["bogus"],
    "prune.calibration_blocks": [0],
    "prune.seed": [-1],
    # quantize
    "quantize.method": ["bogus"],
    "quantize.default": ["int3", "int4_g7", ("int4_g48", {"quantize.on_bad_group": "error"})],
    "quantize.rules": [[{"pattern": "x"}], [{"pattern": "(", "scheme": "int8"}], [{"pattern": "x", "scheme": "int5"}]],
    "quantize.on_bad_group": ["skip"],
    "quantize.calibration_blocks": [0],
    "quantize.damp": [0.0, 1.0, NAN],
    "quantize.block_size": [0],
    "quantize.awq_grid": [0],
    "quantize.embedding": ["int5_g32", "int3_g12", "fp8"],
    "quantize.target_mb": [0, -3.0, NAN, (40.0, {"quantize.target_bits": 4.0})],
    "quantize.target_bits": [0, NAN],
    "quantize.candidates": [[], ["none"], ["int4_g32", "int9"]],
    "quantize.grid_schemes": [["none"], ["int4_g32_min", "int9_min"]],
    # export
    "export.dtype": ["bfloat8"],
    "export.kernels": ["fast"],
    "export.check_tokens": [1],
    "export.bench_context": [0],
    "export.bench_decode_tokens": [0],
    "export.check_nll_tolerance": [0.0, NAN, INF],
    # data (its checks are the data package's own: codexmini.data.check_data_config)
    "data.source": ["/nonexistent/corpus"],
    "data.format": ["bogus"],
    "data.max_files": [0],
    "data.sources": [[{"source": "/nonexistent/corpus"}], [{"source": "stdlib", "weight": -1.0}]],
    "data.mixture_stopping": ["bogus"],
    "data.val_fraction": [0.0, 1.0, NAN],
    "data.block_size": [0, 1],
    "data.max_train_blocks": [0],
    "data.max_val_blocks": [0],
    "data.num_calibration": [-1],
}

# Fields without a range or a set of values, and why.
NO_RANGE = {
    "description": "free text",
    "output_dir": "any folder (created on demand)",
    "teacher": "free-form: its keys are bound to the loader's signature (see TEACHER_TABLE)",
    "stages": "checked entry by entry (stage names and overrides: tests below)",
    "model.linear_decay": "a bool (OmegaConf refuses anything else at compose)",
    "model.tie_word_embeddings": "a bool",
    "trainer.gradient_checkpointing": "a bool",
    "distill.fake_quant": "a bool",
    "quantize.untie_head": "a bool",
    "quantize.act_order": "a bool",
    "quantize.search": "a bool",
    "export.gguf": "a bool",
    "data.text_field": "any column name (checked against the files' columns where a quick look can tell)",
    "data.file_glob": "any glob",
    "data.seed": "any integer seeds the split",
    "data.tokenizer_vocab_size": "used only without a teacher tokenizer (train_bpe_tokenizer checks it)",
    "data.cache_dir": "any folder",
}

TEACHER_TABLE = [
    (["teacher=hf", "teacher.spec=/nonexistent/teacher"], "teacher path /nonexistent/teacher does not exist"),
    (["teacher=hf", "teacher.spec=/nonexistent/t.gguf"], "teacher GGUF file /nonexistent/t.gguf does not exist"),
    (["teacher=smollm2", "teacher.dtype=float8"], "teacher.dtype 'float8'"),
    (["teacher=smollm2", "teacher.quantization=8bit"], "teacher.quantization"),
    (["teacher.hidden_size=0"], "teacher.hidden_size"),
    (["teacher.num_attention_heads=3"], "teacher.num_attention_heads"),
    (["teacher.num_key_value_heads=3"], "teacher.num_key_value_heads"),
    (["teacher.vocab_size=100"], "teacher.vocab_size"),
    (["teacher.pretrain_steps=-1"], "teacher.pretrain_steps"),
    (["+teacher.hidden_sizes=64"], "does not accept"),
    (["teacher.hidden_size=abc"], "teacher.hidden_size = 'abc' has the wrong type"),
]


def _rows():
    for key, values in TABLE.items():
        for v in values:
            value, extra = v if isinstance(v, tuple) else (v, {})
            yield pytest.param(key, value, extra, id=f"{key}={value!r}" + (f"+{extra}" if extra else ""))


@pytest.fixture(scope="module")
def base():
    return compose("tiny_smoke")


def _with(base, settings: dict):
    cfg = base.copy()
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_the_table_covers_every_field_with_a_range():
    """Every field of every run-config section (and the run's own scalars) has rows or a reason not to."""
    keys = [f.name for f in fields(RunBase) if f.name not in groups()]
    for section, schema in groups().items():
        keys += [f"{section}.{f.name}" for f in fields(schema)]
    missing = [k for k in keys if k not in TABLE and k not in NO_RANGE]
    assert not missing, f"add bad values for these fields to TABLE (or a reason to NO_RANGE): {missing}"
    stale = [k for k in [*TABLE, *NO_RANGE] if k not in keys]
    assert not stale, f"the table names fields no schema has: {stale}"


@pytest.mark.parametrize("key, value, extra", list(_rows()))
def test_a_bad_value_fails_validate_naming_its_key(base, key, value, extra):
    try:
        cfg = _with(base, {**extra, key: value})
    except OmegaConfBaseException as err:  # a value the schema's type refuses: also named, at compose
        assert key in str(err), err
        return
    problems = validate(cfg)
    assert problems, f"{key}={value!r} passed validate"
    assert any(key in p for p in problems), problems


@pytest.mark.parametrize("key", [k for k, why in NO_RANGE.items() if why.startswith("a bool")])
def test_a_bool_field_refuses_anything_else_at_compose(key, capsys):
    assert run_cli("validate", "tiny_smoke", f"{key}=maybe") == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", TEACHER_TABLE, ids=[" ".join(o) for o, _ in TEACHER_TABLE])
def test_bad_teacher_settings_fail_validate(overrides, message, capsys):
    code = run_cli("validate", "tiny_smoke", *overrides)
    captured = capsys.readouterr()
    assert code in (1, 2) and message in captured.out + captured.err


STAGE_ROWS = [
    ("distill", "trainer.lr", ".nan"), ("distill", "trainer.warmup_steps", "-5"),
    ("distill", "distill.temperature", "0"), ("distill", "data.block_size", "0"),
    ("transfer", "transfer.steps", "-1"), ("prune", "prune.mlp", "1.5"), ("quantize", "quantize.damp", "2.0"),
    ("quantize", "quantize.default", "int4_g48"), ("export", "export.check_tokens", "1"),
    ("generate", "generate.max_new_tokens", "-1"),
]

RECIPE = """defaults:
  - base_run
  - teacher: tiny_random
  - model: tiny_from_teacher
  - data: stdlib_tiny
  - distill: forward_kl
  - transfer: hedgehog
  - prune: mlp_tiny
  - quantize: int4_gptq
  - export: cmx
  - trainer: smoke
  - generate: code
  - _self_
quantize:
  on_bad_group: error
stages:
  - stage: distill
  - stage: {stage}
    overrides: {{{key}: {value}}}
"""


@pytest.mark.parametrize("stage, key, value", STAGE_ROWS, ids=[f"{s}:{k}={v}" for s, k, v in STAGE_ROWS])
def test_the_same_values_inside_a_recipes_stage_overrides_are_refused(tmp_path, stage, key, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(stage=stage, key=key, value=value))
    problems = validate(compose(str(recipe)))
    assert any(p.startswith("stages[1]") and key in p for p in problems), problems
    assert not any(p.startswith("stages[0]") for p in problems), problems  # the other stage is fine


def test_an_override_of_a_section_the_stage_does_not_read_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(stage="export", key="trainer.max_steps", value="3"))
    problems = validate(compose(str(recipe)))
    assert any("stages[1].overrides" in p and "does not read the 'trainer' section" in p for p in problems)


@pytest.mark.parametrize("override, key", [("+model.keep_layerz=2", "model.keep_layerz"),
                                           ("+trainer.max_stesp=5", "trainer.max_stesp"),
                                           ("+stages.0.nmae=x", "stages[0].nmae"),
                                           ("+data.blocksize=8", "data.blocksize"),
                                           ("+colour=blue", "colour")])
def test_plus_keys_past_the_schema_are_refused_naming_the_key(override, key, tmp_path, capsys):
    out = tmp_path / "runs"
    assert run_cli("validate", "tiny_smoke", override) == 2
    assert f"unknown key {key}" in capsys.readouterr().err
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", *TINY, override) == 2
    err = capsys.readouterr().err
    assert f"unknown key {key}" in err and "Traceback" not in err
    assert not out.exists()


def test_a_misspelt_plus_key_gets_a_suggestion(capsys):
    assert run_cli("validate", "tiny_smoke", "+model.keep_layerz=2") == 2
    assert "did you mean model.keep_layers?" in capsys.readouterr().err


def test_a_bad_value_stops_run_before_any_work(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run_cli("run", "tiny_smoke", f"output_dir={out}", "trainer.lr=nan", "data.max_files=0", *TINY) == 2
    err = capsys.readouterr().err
    assert "trainer.lr must be a finite number" in err and "data.max_files" in err
    assert not out.exists()


def test_malformed_yaml_in_a_recipe_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - base_run\nstages:\n  - stage: distill\n   name: x\n")
    assert run_cli("validate", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:5:" in err and "not valid YAML" in err
