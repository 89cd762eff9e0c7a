"""Every YAML composes and validates; bad keys, types and targets fail with clear messages."""


import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from codexmini.config import CONFIG_DIR, RECIPE_DIR, compose, instantiate, recipe_path
from codexmini.pipeline import validate

RECIPES = sorted(RECIPE_DIR.rglob("*.yaml"))
GROUP_OPTIONS = sorted(CONFIG_DIR.rglob("*.yaml"))
# Group options that need a value the user must give, or one that fits tiny_smoke (a 4-layer teacher, a 3-layer
# student, 64-token blocks): validate checks them against the teacher's shape, and unchanged they would fail.
REQUIRED = {"teacher/hf": ["teacher.spec=HuggingFaceTB/SmolLM2-135M"],
            "distill/gkd_on_policy": ["distill.on_policy_prompt_tokens=16"],
            "distill/sequence_level": ["distill.on_policy_prompt_tokens=16"],
            "model/smollm2_20l": ["teacher=smollm2"],
            "prune/depth": ["prune.drop_layers=1"]}


def test_there_are_yamls_to_check():
    assert len(RECIPES) >= 2 and len(GROUP_OPTIONS) >= 10


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_composes_validates_and_starts_with_its_command(path):
    cfg = compose(str(path))
    assert validate(cfg) == []
    assert cfg.recipe == path.stem
    assert path.read_text().splitlines()[0] == f"# codexmini run {path.stem}"


@pytest.mark.parametrize("path", GROUP_OPTIONS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_group_option_composes_into_a_recipe(path):
    group, option = path.parent.relative_to(CONFIG_DIR).as_posix(), path.stem
    cfg = compose("tiny_smoke", [f"{group}={option}", *REQUIRED.get(f"{group}/{option}", [])])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    problems = validate(cfg)
    assert problems == [], problems


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        compose("tiny_smoke", ["trainer.max_stepz=3"])
    assert "max_stepz" in str(err.value) and "max_stepz" in str(err.value.__cause__)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose("tiny_smoke", ["trainer.max_steps=abc"])
    assert "trainer.max_steps" in str(err.value.__cause__)


def test_unknown_key_inside_a_group_yaml_fails(tmp_path, monkeypatch):
    import codexmini.config as config

    groups = tmp_path / "configs"
    (groups / "trainer").mkdir(parents=True)
    (groups / "trainer" / "bad.yaml").write_text("max_step: 3\n")
    monkeypatch.setattr(config, "CONFIG_DIR", groups)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults:\n  - base_run\n  - trainer: bad\n  - _self_\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose(str(recipe))
    assert "trainer.max_step" in str(err.value)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="not allowed"):
        instantiate({"_target_": "os.system", "command": "echo hi"})
    cfg = compose("tiny_smoke", ["teacher._target_=subprocess.run"])
    assert any("not allowed" in p for p in validate(cfg))


def test_target_signature_is_checked():
    cfg = compose("tiny_smoke", ["+teacher.temperature=2"])
    assert any("does not accept" in p for p in validate(cfg))


def test_bad_stage_and_override_keys_are_reported():
    cfg = compose("tiny_smoke")
    cfg.stages[0].stage = "destill"
    cfg.stages[1].overrides = {"trainer.max_stepz": 3}
    problems = validate(cfg)
    assert any("stages[0].stage 'destill'" in p for p in problems)
    assert any("trainer.max_stepz" in p for p in problems)


def test_bad_recipe_name_lists_close_matches():
    with pytest.raises(FileNotFoundError, match="Did you mean: quickstart"):
        recipe_path("quickstrat")


def test_missing_data_path_is_reported_before_running(tmp_path):
    cfg = compose("tiny_smoke", [f"data.source={tmp_path / 'nope'}"])
    assert any(p.startswith("data.source") for p in validate(cfg))


@pytest.mark.parametrize("override, message", [
    ("export.dtype=bfloat8", "export.dtype 'bfloat8'"),
    ("export.kernels=fast", "export.kernels 'fast'"),
    ("quantize.default=int3", "int3"),
    ("prune.mlp=1.5", "prune.mlp = 1.5"),
])
def test_bad_stage_settings_are_reported_before_running(override, message):
    problems = validate(compose("tiny_smoke", [override]))
    assert any(message in p for p in problems), problems
