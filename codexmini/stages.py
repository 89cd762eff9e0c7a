"""The stage registry: how the pipeline, `validate` and the CLI find a stage without being edited.

A stage lives in its own package and declares itself in that package's `stage.py`:

    register(Stage(name="distill", run=run_distill, schema=DistillConfig, uses=("trainer", "data", "teacher"),
                   check=check_distill))

* `run(model, cfg, ctx) -> (model, metrics)`: `cfg` is the stage's own config section as its plain dataclass
  (`schema`), `ctx` a `StageContext` (teacher, tokenizer, data, the stage folder, other sections it `uses`).
* `schema` becomes a section of the run config (`RunConfig.<section>`, typed by Hydra's ConfigStore), so a config
  group `configs/<section>/` with YAML options is all a recipe needs to pick it.
* `uses`: the other sections the stage reads; with its own section they key its resume (a change in any of them
  redoes the stage). A callable `uses(cfg) -> tuple` may depend on the stage's own settings.
* `check(cfg, ctx)`: a pre-flight check run by `validate` (and so before any work) that raises `ValueError`
  naming the key.
* `shapes(cfg, ctx, config)`: what the stage does to the student's config, known before running (pruning by
  ratio sets widths, quantizing fixes them), with the problems it finds against it (a group size that does not
  divide a width): `validate` walks the recipe's stages with it.

Built-in stages are the `stage.py` modules of codexmini's subpackages, found by looking, not by a list. Stages in
other installed packages declare an entry point in the group `codexmini.stages` that names a module to import.
Only installed code registers stages: nothing in a recipe can make the pipeline import a module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "codexmini.stages"
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Sections every run has, owned by the run config itself (config.py); a stage may `use` them but not declare them.
BASE_SECTIONS = ("teacher", "model", "data", "trainer", "generate")


@dataclass(frozen=True)
class Stage:
    """A registered stage (see the module docstring for each field's contract)."""

    name: str
    run: Callable[..., tuple[Any, dict]]
    schema: type | None = None
    section: str | None = None  # the run-config section holding `schema` (default: the stage's name)
    uses: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    check: Callable[[Any, Any], None] | None = None
    # shapes(cfg, ctx, config) -> (config after the stage or None where only running tells, problems): lets
    # `validate` follow the student's widths through the recipe and check them before any work (None: unchanged).
    shapes: Callable[[Any, Any, Any], tuple[Any, list[str]]] | None = None
    produces_model: bool = True  # False: the stage reports (export, eval) and the next stage gets its input
    help: str = ""
    config_dir: str | None = None  # a folder of config groups shipped beside the stage, added to the search path

    @property
    def section_name(self) -> str | None:
        return (self.section or self.name) if self.schema is not None else None

    def sections(self, cfg=None) -> tuple[str, ...]:
        """Every config section that keys this stage's result: its own, then what it uses."""
        uses = self.uses(cfg) if callable(self.uses) else self.uses
        own = (self.section_name,) if self.section_name else ()
        return (*own, *(u for u in uses if u not in own))


_REGISTRY: dict[str, Stage] = {}
_LOADED = False


def register(stage: Stage) -> Stage:
    """Add a stage; registering the same name twice with another function is an error (one home per name)."""
    if not NAME_RE.match(stage.name):
        raise ValueError(f"stage name {stage.name!r} must be lower-case letters, digits and _ (e.g. 'distill')")
    if stage.schema is not None and not is_dataclass(stage.schema):
        raise TypeError(f"stage {stage.name!r}: schema must be a dataclass, got {stage.schema!r}")
    section = stage.section_name
    if section is not None:
        if not NAME_RE.match(section) or section in BASE_SECTIONS or section in ("recipe", "stages", "seed"):
            raise ValueError(f"stage {stage.name!r}: section {section!r} is reserved or not a plain name")
        for other in _REGISTRY.values():
            if other.name != stage.name and other.section_name == section and other.schema is not stage.schema:
                raise ValueError(f"stage {stage.name!r}: section {section!r} already belongs to stage "
                                 f"{other.name!r} with another schema")
    old = _REGISTRY.get(stage.name)
    if old is not None and (old.run is not stage.run or old.schema is not stage.schema):
        raise ValueError(f"stage {stage.name!r} is already registered by {old.run.__module__}")
    _REGISTRY[stage.name] = stage
    return stage


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("codexmini")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.ispkg and importlib.util.find_spec(f"codexmini.{info.name}.stage") is not None:
            importlib.import_module(f"codexmini.{info.name}.stage")
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except ImportError as err:
            raise ImportError(f"the stage plugin {ep.name!r} (entry point {ep.value!r} in group "
                              f"{ENTRY_POINT_GROUP!r}) failed to import: {err}") from err


def reload() -> None:
    """Look for stage modules and entry points again (after installing a plugin in a running process)."""
    global _LOADED
    _LOADED = False
    _load()


def stages() -> dict[str, Stage]:
    """Every registered stage by name (built-in ones and plugins)."""
    _load()
    return dict(_REGISTRY)


def get(name: str) -> Stage:
    known = stages()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"stage {name!r} is not one of {sorted(known)}.{hint}")
    return known[name]


def sections() -> dict[str, type]:
    """{section: schema} of every registered stage's own config section."""
    out = {}
    for stage in stages().values():
        if stage.section_name:
            out[stage.section_name] = stage.schema
    return dict(sorted(out.items()))


def config_dirs() -> list[Path]:
    """Folders of config groups that registered stages ship beside their code."""
    return [Path(s.config_dir) for s in stages().values() if s.config_dir]


@dataclass
class StageContext:
    """What a stage gets besides its model and its own config: the shared teacher/tokenizer/data of the process,
    the other config sections it declared in `uses` (as plain dataclasses), its output folder, and its position in
    the run's stages (`index`, 1 for the first; 0 outside a run)."""

    folder: Path
    seed: int
    _configs: dict[str, Any] = field(default_factory=dict)
    _shared: Any = None  # the pipeline's per-process context (teacher and data loaded lazily, once)
    index: int = 0

    def config(self, section: str):
        """Another section's settings (only those the stage declared it `uses`)."""
        if section not in self._configs:
            raise KeyError(f"section {section!r} was not declared in the stage's `uses` ({sorted(self._configs)})")
        return self._configs[section]

    @property
    def teacher(self):
        return self._shared.teacher

    @property
    def tokenizer(self):
        return self._shared.tokenizer

    @property
    def data(self):
        return self._shared.data
