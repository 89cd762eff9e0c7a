"""The import rules of the package layout, checked over the real import graph (every import statement, also the
ones inside functions): dependencies point one way, ops and the runtime stay light, stages never import each other.

    level 0  ops, files, errors, stages (the registry); then cmx (the file format, on ops)
    level 1  models, data, runtime
    level 2  train
    level 3  stage packages (any package with a stage.py: distill, prune, quantize, export, evaluate, ...)
    level 4  config
    level 5  pipeline, report
    level 6  cli
A module may import its own group and groups of a lower level only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "codexmini"
LEVELS = {"ops": 0, "files": 0, "errors": 0, "stages": 0, "": 0, "cmx": 0.5,
          "models": 1, "data": 1, "runtime": 1, "train": 2, "serve": 2, "config": 4, "pipeline": 5, "report": 5,
          "cli": 6}
STAGE_LEVEL = 3
STDLIB = set(sys.stdlib_module_names)
# What a group may import from outside codexmini (None: anything installed).
EXTERNAL = {"ops": {"torch"}, "cmx": {"torch", "safetensors"},
            "runtime": {"torch", "safetensors", "tokenizers", "numpy"}}
HYDRA_USERS = {"pipeline", "config", "cli"}


def _imports(path: Path, module: str):
    """(imported module, line) for every import in a file, relative imports resolved against `module`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
                for name in names:
                    yield name, node.lineno
            else:
                yield node.module, node.lineno


def violations(package_dir: Path) -> list[str]:
    """Every import that breaks a rule, as 'file:line: what'."""
    root = package_dir.name
    stage_groups = {p.parent.name for p in package_dir.glob("*/stage.py")}
    groups = {p.stem if p.is_file() else p.name for p in package_dir.iterdir()
              if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}

    def group_of(parts: list[str]) -> str:
        return parts[1] if len(parts) > 1 and parts[1] in groups else ""

    def level(group: str) -> int:
        return STAGE_LEVEL if group in stage_groups else LEVELS.get(group, STAGE_LEVEL)

    out = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        group = group_of(module.split("."))
        for target, line in _imports(path, module):
            where = f"{path.relative_to(package_dir.parent)}:{line}"
            top = target.split(".")[0]
            if top == root:
                other = group_of(target.split("."))
                if other == group:
                    continue
                if group in stage_groups and other in stage_groups:
                    out.append(f"{where}: stage {group!r} imports stage {other!r} (share code through ops, "
                               "models, data or train)")
                elif level(other) >= level(group):
                    out.append(f"{where}: {group or root} (level {level(group)}) imports {target} (level "
                               f"{level(other)}); dependencies point from higher levels to lower ones")
                continue
            if top == "scripts":
                out.append(f"{where}: imports scripts/ (scripts import codexmini, never the reverse)")
            if top in ("hydra", "omegaconf") and group not in HYDRA_USERS:
                out.append(f"{where}: {group} imports {top} (only pipeline, config and cli touch Hydra)")
            allowed = EXTERNAL.get(group)
            if allowed is not None and top not in STDLIB and top not in allowed and top != "__future__":
                out.append(f"{where}: {group} imports {top}; it may import only the standard library and "
                           f"{', '.join(sorted(allowed))}")
    return out


def test_the_package_follows_the_import_rules():
    assert violations(PACKAGE) == []


def test_a_broken_rule_is_found(tmp_path):
    pkg = tmp_path / "codexmini"
    for sub in ("ops", "runtime", "models", "distill", "prune"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "distill" / "stage.py").write_text("from ..prune.width import prune\n")
    (pkg / "prune" / "stage.py").write_text("")
    (pkg / "ops" / "math.py").write_text("import transformers\nfrom ..models import x\n")
    (pkg / "runtime" / "model.py").write_text("def f():\n    from ..distill import loss\n    import hydra\n")
    (pkg / "models" / "m.py").write_text("import scripts.bench_runtime\n")
    found = "\n".join(violations(pkg))
    assert "stage 'distill' imports stage 'prune'" in found
    assert "ops imports transformers" in found
    assert "ops (level 0) imports codexmini.models" in found
    assert "runtime (level 1) imports codexmini.distill" in found  # imports inside functions count too
    assert "runtime imports hydra" in found and "only pipeline, config and cli touch Hydra" in found
    assert "imports scripts/" in found
    assert len(violations(pkg)) == 7
