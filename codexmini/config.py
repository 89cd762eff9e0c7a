"""Config schemas (dataclasses registered in Hydra's ConfigStore), recipe composition, and safe instantiation.

Defaults live here only. Recipes in `recipes/` pick groups from `configs/` and override a few values; composing
merges them into these typed schemas, so an unknown key or a wrong type fails at composition, naming the key.
Only `pipeline.py` and `cli.py` use this module: stage functions take the plain dataclasses.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from .data.corpus import DataConfig
from .distill.attention_transfer import TransferConfig
from .distill.loop import DistillConfig, TrainerConfig
from .prune.width import PruneConfig
from .export.to_cmx import ExportConfig
from .quantize.apply import QuantizeConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(os.environ.get("CODEXMINI_CONFIG_DIR", REPO_ROOT / "configs"))
RECIPE_DIR = Path(os.environ.get("CODEXMINI_RECIPE_DIR", REPO_ROOT / "recipes"))
# instantiate() refuses any other target: `_target_` on untrusted YAML would otherwise be code execution.
ALLOWED_TARGET_PREFIXES = ("codexmini.", "torch.optim.", "transformers.")


@dataclass
class ModelConfig:
    """How the student starts: built from the teacher, from scratch, or loaded from a folder."""

    init: str = "from_teacher"  # from_teacher | scratch | folder
    path: str | None = None  # init=folder: a from_pretrained folder (e.g. an earlier stage)
    layers: list[int] | None = None  # from_teacher: teacher layers to keep (default all)
    keep_layers: int | None = None  # from_teacher: keep this many layers, chosen by block influence
    layer_types: list[str] | None = None  # per student layer: softmax | linear | hybrid (default all softmax)
    feature_map: str = "hedgehog"
    sliding_window: int = 64
    linear_decay: bool = False
    linear_chunk_size: int = 64
    # init=scratch only:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    head_dim: int | None = None
    tie_word_embeddings: bool = True
    embedding_rank: int | None = None


@dataclass
class GenerateConfig:
    prompt: str = "def fibonacci(n):"
    max_new_tokens: int = 48


@dataclass
class StageSpec:
    """One entry of a recipe's `stages`: which stage, an optional folder name, and config overrides applied to
    this stage only (dotted keys, e.g. {"trainer.max_steps": 40})."""

    stage: str = "distill"
    name: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    recipe: str = "custom"
    description: str = ""
    run_name: str = "default"  # runs/<recipe>/<run_name>/; re-running the same name resumes
    output_dir: str = "runs"
    seed: int = 0
    # The teacher is a seam: `_target_` names the loader, the other keys are its arguments.
    teacher: dict[str, Any] = field(default_factory=dict)  # pick one from configs/teacher/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    stages: list[StageSpec] = field(default_factory=list)


GROUPS = {"model": ModelConfig, "data": DataConfig, "distill": DistillConfig, "transfer": TransferConfig,
          "prune": PruneConfig, "quantize": QuantizeConfig, "export": ExportConfig,
          "trainer": TrainerConfig, "generate": GenerateConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    """A recipe name from recipes/ or a path to a YAML file; a bad name lists the close matches."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    candidate = RECIPE_DIR / f"{recipe}.yaml"
    if candidate.is_file():
        return candidate
    known = list_recipes()
    close = difflib.get_close_matches(recipe, known, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"no recipe {recipe!r} in {RECIPE_DIR}.{hint} Known recipes: {', '.join(known)}")


def compose(recipe: str, overrides: list[str] | tuple[str, ...] = ()):
    """Compose a recipe with Hydra overrides into a typed OmegaConf config (RunConfig schema)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    path = recipe_path(recipe)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(path.parent), version_base=None):
        cfg = hydra_compose(config_name=path.stem,
                            overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]", *overrides])
    return cfg


def instantiate(node: dict | Any, **extra):
    """Call `node._target_` with the node's other keys (plus `extra`), refusing targets outside the allow-list."""
    fn, kwargs = resolve_target(node)
    kwargs.update(extra)
    return fn(**kwargs)


def resolve_target(node) -> tuple[Any, dict]:
    """The callable a `_target_` names and its keyword arguments, after the allow-list check."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = data.pop("_target_", None)
    if not isinstance(target, str) or not target:
        raise ValueError(f"config node has no _target_: {data}")
    if not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise ValueError(f"_target_ {target!r} is not allowed; targets must start with one of "
                         f"{ALLOWED_TARGET_PREFIXES}")
    module_name, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"_target_ {target!r} cannot be imported: {err}") from err
    data.pop("_partial_", None)
    return fn, data


def check_target_signature(node, provided: tuple[str, ...] = ()) -> None:
    """Bind a `_target_` node's keys (plus arguments the pipeline provides) to the callable's signature."""
    fn, kwargs = resolve_target(node)
    try:
        inspect.signature(fn).bind_partial(**kwargs, **{k: None for k in provided})
    except TypeError as err:
        raise ValueError(f"_target_ {fn.__module__}.{fn.__qualname__} does not accept {sorted(kwargs)}: {err}") \
            from err
