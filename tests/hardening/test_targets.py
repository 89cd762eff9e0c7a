"""Issue 16, item 1: a config may instantiate only the callables listed in `codexmini.config.TARGETS`; the issue's
exploits (unpickling a file, importing a local module, writing and copying any file) are refused by `validate`
and by `run`, and nothing is written or loaded."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import yaml

from codexmini.config import CONFIG_DIR, RECIPE_DIR, TARGETS, compose, instantiate, resolve_target
from codexmini.pipeline import validate
from tests.hardening.conftest import TINY_STAGES, run_cli

PACKAGE = Path(__file__).resolve().parents[2] / "codexmini"
ALLOWED = {"codexmini.models.teacher.load_teacher", "codexmini.train.pretrain.tiny_random_teacher"}


class _Payload:
    """Unpickling this creates the marker file: what a hostile checkpoint would do (harmlessly here)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _targets_in(node, where: str):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield where, value
            yield from _targets_in(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets_in(value, f"{where}[{i}]")


def test_the_allow_list_is_exactly_the_teacher_loaders():
    assert set(TARGETS) == ALLOWED
    for path in TARGETS:
        fn, _ = resolve_target({"_target_": path})
        assert callable(fn) and f"{fn.__module__}.{fn.__qualname__}" == path


def test_every_shipped_target_is_listed_and_only_the_teacher_has_one():
    found = []
    for path in sorted([*CONFIG_DIR.rglob("*.yaml"), *RECIPE_DIR.rglob("*.yaml")]):
        for where, target in _targets_in(yaml.safe_load(path.read_text()) or {}, ""):
            found.append((path, where, target))
            assert target in TARGETS, (path, target)
            group = path.parent.name
            assert (group == "teacher" and where == "") or where.startswith("teacher"), (path, where)
    assert {t for _, _, t in found} == ALLOWED


def test_nothing_else_in_the_package_instantiates_from_a_config():
    """Hydra's own instantiate/call is never used, and the only import of a module named by data is the guarded
    one in `config.resolve_target` (the registry imports codexmini's own stage modules and installed entry points,
    which a recipe cannot name)."""
    importers = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hydra.utils"):
                pytest.fail(f"{path}: imports {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("instantiate", "call") and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "utils":
                pytest.fail(f"{path}:{node.lineno}: hydra.utils.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "import_module":
                importers.setdefault(path.relative_to(PACKAGE).as_posix(), []).append(node.lineno)
    assert set(importers) == {"__init__.py", "config.py", "stages.py", "models/configuration.py"}, importers
    assert len(importers["config.py"]) == 1


@pytest.mark.parametrize("target", ["os.system", "subprocess.run", "builtins.eval", "codexmini.files.write_atomic",
                                    "torch.load", "transformers.modeling_utils.load_state_dict"])
def test_instantiate_refuses_anything_not_listed(target, tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        instantiate({"_target_": target, "path": str(tmp_path / "x"), "text": "x"})
    assert not (tmp_path / "x").exists()


def _exploits(tmp_path: Path) -> dict[str, tuple[list[str], Path]]:
    """The issue's four overrides, each with the file whose existence would show that it ran."""
    evil = tmp_path / "EVIL.bin"
    evil.write_bytes(pickle.dumps(_Payload(tmp_path / "unpickled")))
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "evilmod.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w')\nclass Evil: pass\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    return {
        "load_state_dict": (["+teacher._target_=transformers.modeling_utils.load_state_dict",
                             f"+teacher.checkpoint_file={evil}", "+teacher.weights_only=false"],
                            tmp_path / "unpickled"),
        "dynamic_module": (["+teacher._target_=transformers.dynamic_module_utils.get_class_from_dynamic_module",
                            "+teacher.class_reference=evilmod.Evil",
                            f"+teacher.pretrained_model_name_or_path={module_dir}"], tmp_path / "imported"),
        "write_atomic": (["+teacher._target_=codexmini.files.write_atomic", f"+teacher.path={tmp_path / 'written'}",
                          "+teacher.text=pwned"], tmp_path / "written"),
        "copyfile": (["+teacher._target_=transformers.tokenization_utils_tokenizers.copyfile",
                      f"+teacher.src={secret}", f"+teacher.dst={tmp_path / 'copied'}"], tmp_path / "copied"),
    }


@pytest.mark.parametrize("name", ["load_state_dict", "dynamic_module", "write_atomic", "copyfile"])
def test_the_issues_exploits_are_refused_by_validate_and_run(name, tmp_path, capsys):
    overrides, evidence = _exploits(tmp_path)[name]
    out = tmp_path / "runs"
    args = ["tiny_smoke", "~teacher", *overrides, f"output_dir={out}", *TINY_STAGES]
    assert run_cli("validate", *args) == 1
    said = capsys.readouterr().out
    assert "is not allowed" in said and "teacher" in said
    assert run_cli("run", *args) == 2
    assert "is not allowed" in capsys.readouterr().err
    assert not evidence.exists(), f"{name} ran: {evidence} exists"
    assert not out.exists()  # refused before any work: not even the run folder was made
    problems = validate(compose("tiny_smoke", ["~teacher", *overrides]))
    assert len(problems) == 1 and problems[0].startswith("teacher: _target_")


@pytest.mark.parametrize("section", ["model", "trainer", "data", "distill", "quantize", "export", "generate"])
def test_a_target_in_any_other_section_is_refused_at_compose(section, tmp_path, capsys):
    override = f"+{section}._target_=codexmini.files.write_atomic"
    assert run_cli("validate", "tiny_smoke", override, f"+{section}.path={tmp_path / 'w'}") == 2
    err = capsys.readouterr().err
    assert f"unknown key {section}._target_" in err
    assert not (tmp_path / "w").exists()


def test_a_stage_override_cannot_set_the_teacher(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults:\n  - base_run\n  - teacher: tiny_random\n  - model: tiny_from_teacher\n"
                      "  - data: stdlib_tiny\n  - trainer: smoke\n  - _self_\n"
                      "stages:\n  - stage: distill\n    overrides: {teacher._target_: codexmini.files.write_atomic}\n")
    problems = validate(compose(str(recipe)))
    assert any("stages[0].overrides" in p and "teacher" in p for p in problems), problems
