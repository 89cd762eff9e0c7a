"""Config schemas, recipe composition (package data + a team's own folders), and the safe instantiate.

Defaults live in the schemas only: the run's own sections here, each stage's section in its package (registered
with `codexmini.stages`), the model architecture in `CodexMiniConfig`. Recipes pick groups from the config folders
and override a few values; composing merges them into the typed schemas, so an unknown key or a wrong type fails
at composition, naming the key. Only `pipeline.py`, `config.py` and `cli.py` use Hydra/OmegaConf: stage functions
take the plain dataclasses.

Where configs come from, first match wins:
  1. the folder of a recipe given as a path (its groups sit beside it, as `codexmini init` writes them),
  2. each `--config-dir DIR` (groups in DIR/<group>/, recipes in DIR/ or DIR/recipes/),
  3. folders of config groups that registered stages ship,
  4. the package's own `codexmini/configs/` and `codexmini/recipes/` (installed with the wheel).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import stages as registry
from .data import DataConfig
from .train import TrainerConfig

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
RECIPE_DIR = PACKAGE_DIR / "recipes"

# The only callables a config may name with `_target_` (a recipe is a file people share: instantiating anything
# else would be code execution). Installed code may add its own with `allow_target`.
TARGETS: dict[str, str] = {
    "codexmini.models.teacher.load_teacher": "load a teacher: hub id, folder, .gguf, stage folder, packaged name",
    "codexmini.train.pretrain.tiny_random_teacher": "a tiny random Llama teacher made on the fly (smoke tests)",
}


# What `validate` runs for a target besides binding its signature, with the target's arguments (defaults filled
# in): `TARGET_CHECKS[path](kwargs)` raises ValueError / FileNotFoundError naming the key;
# `TARGET_ARCHITECTURES[path](kwargs)` gives the teacher's transformers config without loading its weights (or
# None when that cannot be known cheaply), so the student's layers and widths are checked before any work.
TARGET_CHECKS: dict[str, Callable[[dict], None]] = {}
TARGET_ARCHITECTURES: dict[str, Callable[[dict], Any]] = {}


def allow_target(path: str, description: str = "", check: Callable[[dict], None] | None = None,
                 architecture: Callable[[dict], Any] | None = None) -> None:
    """Let configs name the callable at `path` (module.attr) as a `_target_` (for plugins' own teacher loaders),
    optionally with a pre-flight `check` of its arguments and an `architecture` reader (see TARGET_CHECKS)."""
    module, _, attr = path.rpartition(".")
    if not module or not attr.isidentifier():
        raise ValueError(f"target {path!r} must be 'package.module.function'")
    TARGETS[path] = description
    if check is not None:
        TARGET_CHECKS[path] = check
    if architecture is not None:
        TARGET_ARCHITECTURES[path] = architecture


def _check_load_teacher(kw: dict) -> None:
    from .models.teacher import check_teacher_spec

    check_teacher_spec(kw.get("spec"), kw.get("dtype", "float32"), kw.get("quantization"))


def _load_teacher_architecture(kw: dict):
    from .models.teacher import teacher_config

    return teacher_config(kw["spec"])


_TINY_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def _check_tiny_random_teacher(kw: dict) -> None:
    for name in (*_TINY_SIZES, "vocab_size"):
        value = kw.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"teacher.{name} must be an integer >= 1, got {value!r}")
    from .data.tokenizer import SPECIAL_TOKENS

    least = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds the 256 bytes and the special tokens
    if kw["vocab_size"] < least:
        raise ValueError(f"teacher.vocab_size must be >= {least} (256 bytes + special tokens), got {kw['vocab_size']}")
    if kw["hidden_size"] % kw["num_attention_heads"]:
        raise ValueError(f"teacher.hidden_size ({kw['hidden_size']}) must be a multiple of "
                         f"teacher.num_attention_heads ({kw['num_attention_heads']})")
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        raise ValueError(f"teacher.num_key_value_heads ({kw['num_key_value_heads']}) must divide "
                         f"teacher.num_attention_heads ({kw['num_attention_heads']})")
    if (kw["hidden_size"] // kw["num_attention_heads"]) % 2:
        raise ValueError("teacher.hidden_size / teacher.num_attention_heads (the head size) must be even for RoPE")
    for name in ("pretrain_steps", "seed"):
        value = kw.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"teacher.{name} must be an integer >= 0, got {value!r}")


def _tiny_random_architecture(kw: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=kw["vocab_size"], max_position_embeddings=4096, tie_word_embeddings=True,
                       **{k: kw[k] for k in _TINY_SIZES})


allow_target("codexmini.models.teacher.load_teacher", TARGETS["codexmini.models.teacher.load_teacher"],
             _check_load_teacher, _load_teacher_architecture)
allow_target("codexmini.train.pretrain.tiny_random_teacher", TARGETS["codexmini.train.pretrain.tiny_random_teacher"],
             _check_tiny_random_teacher, _tiny_random_architecture)


@dataclass
class ModelConfig:
    """How the student starts: built from the teacher, from scratch, or loaded from a folder.

    The architecture fields default to None, meaning CodexMiniConfig's default (the one home of the model's
    defaults); a value set here is passed on.
    """

    init: str = "from_teacher"  # from_teacher | scratch | folder
    path: str | None = None  # init=folder: a from_pretrained folder (e.g. an earlier stage)
    layers: list[int] | None = None  # from_teacher: teacher layers to keep (default all)
    keep_layers: int | None = None  # from_teacher: keep this many layers, chosen by block influence
    layer_types: list[str] | None = None  # per student layer: softmax | linear | hybrid (default all softmax)
    feature_map: str | None = None
    sliding_window: int | None = None
    linear_decay: bool | None = None
    linear_chunk_size: int | None = None
    # init=scratch only (the teacher gives them otherwise):
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool | None = None
    embedding_rank: int | None = None


MODEL_INITS = ("from_teacher", "scratch", "folder")
# ModelConfig fields that are CodexMiniConfig fields (passed through when set).
ARCH_FIELDS = ("feature_map", "sliding_window", "linear_decay", "linear_chunk_size")
SCRATCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "head_dim", "tie_word_embeddings", "embedding_rank")


@dataclass
class GenerateConfig:
    """The sample a run prints (and the export stage generates with the runtime)."""

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
class RunBase:
    recipe: str = "custom"
    description: str = ""
    run_name: str = "default"  # runs/<recipe>/<run_name>/; re-running the same name resumes
    output_dir: str = "runs"
    seed: int = 0
    # The teacher is a seam: `_target_` names the loader (one of TARGETS), the other keys are its arguments.
    teacher: dict[str, Any] = field(default_factory=dict)  # pick one from configs/teacher/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    stages: list[StageSpec] = field(default_factory=list)


BASE_GROUPS = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "generate": GenerateConfig}


@lru_cache(maxsize=None)
def _run_schema(section_items: tuple[tuple[str, type], ...]) -> type:
    extra = [(name, schema, field(default_factory=schema)) for name, schema in section_items]
    return make_dataclass("RunConfig", extra, bases=(RunBase,))


def run_schema() -> type:
    """The run config: the run's own sections plus one section per registered stage schema."""
    return _run_schema(tuple(registry.sections().items()))


def groups() -> dict[str, type]:
    """{config group: schema} for every section a recipe can pick options for."""
    return {**BASE_GROUPS, **registry.sections()}


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_run", node=run_schema())
    for group, schema in groups().items():
        cs.store(group=group, name=f"base_{group}", node=schema)


# --------------------------------------------------------------------------- where configs and recipes live
def _dirs(config_dirs: Sequence[str | Path]) -> list[Path]:
    out = []
    for d in config_dirs or ():
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"--config-dir {d}: no such folder (it should hold config groups such as "
                                    "trainer/ and data/, and recipes)")
        out.append(p)
    return out


def search_path(config_dirs: Sequence[str | Path] = ()) -> list[Path]:
    """Folders searched for config groups, first match wins."""
    return [*_dirs(config_dirs), *registry.config_dirs(), CONFIG_DIR]


def recipes(config_dirs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """{recipe name: YAML path}: the user's folders first, then the package's recipes."""
    found: dict[str, Path] = {}
    for d in [*_dirs(config_dirs), RECIPE_DIR]:
        for folder in (d, d / "recipes"):
            for p in sorted(folder.glob("*.yaml")):
                if _is_recipe(p):
                    found.setdefault(p.stem, p)
    return found


def _is_recipe(path: Path) -> bool:
    """A recipe is a primary config: it starts from base_run in its defaults list."""
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - an unreadable file is not listed as a recipe; compose reports it
        return False
    return isinstance(data, dict) and "base_run" in (data.get("defaults") or [])


def list_recipes(config_dirs: Sequence[str | Path] = ()) -> list[str]:
    return sorted(recipes(config_dirs))


def recipe_path(recipe: str, config_dirs: Sequence[str | Path] = ()) -> Path:
    """A recipe name (from --config-dir folders or the package) or a path to a YAML file."""
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path.resolve()
        if len(path.parts) > 1:
            raise FileNotFoundError(f"recipe file {recipe} does not exist")
    known = recipes(config_dirs)
    if recipe in known:
        return known[recipe]
    stem = path.stem if path.suffix in (".yaml", ".yml") else recipe
    if stem in known:
        return known[stem]
    close = difflib.get_close_matches(recipe, list(known), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    where = ", ".join(str(d) for d in [*_dirs(config_dirs), RECIPE_DIR])
    raise FileNotFoundError(f"no recipe {recipe!r} in {where}.{hint} Known recipes: {', '.join(sorted(known))}. "
                            "A recipe can also be given as a path to its YAML file.")


def compose(recipe: str, overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = ()):
    """Compose a recipe with Hydra overrides into a typed OmegaConf config (the run schema)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    path = recipe_path(recipe, config_dirs)
    _check_yaml(path)
    extra = list(_dirs(config_dirs))
    if path.parent.name == "recipes" and path.parent != RECIPE_DIR:
        extra.append(path.parent.parent)  # DIR/recipes/x.yaml: DIR's groups come with it
    dirs = [*extra, *registry.config_dirs(), CONFIG_DIR]
    searchpath = ",".join(f"file://{d}" for d in dirs)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(path.parent), version_base=None):
        cfg = hydra_compose(config_name=path.stem, overrides=[f"hydra.searchpath=[{searchpath}]", *overrides])
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"{path.stem}: {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return cfg


def unknown_keys(cfg) -> list[str]:
    """Keys a composed config holds that its schema does not have, one message each naming the key.

    Hydra's `+key=value` adds a key even to a typed section (it opens the struct flag for it), so a typo such as
    `+model.keep_layerz=2` would otherwise be stored and ignored, or reach a dataclass as an unexpected argument.
    Every section typed by a dataclass schema is compared with its fields, recursively (the stage list's entries
    too); free-form sections (`teacher`, a stage's `overrides`) are dicts and checked elsewhere (the teacher's
    keys against its loader's signature).
    """
    from omegaconf import DictConfig, ListConfig

    out: list[str] = []

    def walk(node, where: str) -> None:
        if node._is_none() or node._is_missing():
            return
        if isinstance(node, ListConfig):
            for i in range(len(node)):
                walk(node._get_node(i), f"{where}[{i}]")
            return
        if not isinstance(node, DictConfig) or node._is_interpolation():
            return
        schema = node._metadata.object_type
        known = {f.name: f for f in fields(schema)} if schema is not None and is_dataclass(schema) else None
        for key in node.keys():
            name = f"{where}.{key}" if where else str(key)
            if known is not None and key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
                hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
                out.append(f"unknown key {name}: {'the run config' if not where else where} has no such "
                           f"setting{hint}")
                continue
            if known is not None:
                value = node._get_node(key)
                if isinstance(value, (DictConfig, ListConfig)):
                    walk(value, name)

    walk(cfg, "")
    return out


def _check_yaml(path: Path) -> None:
    """Malformed YAML is named with its file and line, not a parser traceback."""
    import yaml

    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None


# --------------------------------------------------------------------------- the safe instantiate
def instantiate(node: dict | Any, **extra):
    """Call `node._target_` with the node's other keys (plus `extra`), refusing targets not in TARGETS."""
    fn, kwargs = resolve_target(node)
    kwargs.update(extra)
    return fn(**kwargs)


def resolve_target(node) -> tuple[Any, dict]:
    """The callable a `_target_` names and its keyword arguments, after the allow-list check."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = data.pop("_target_", None)
    if not isinstance(target, str) or not target:
        raise ValueError(f"config node has no _target_: {sorted(data)}")
    if target not in TARGETS:
        raise ValueError(f"_target_ {target!r} is not allowed; a config may name only: {', '.join(sorted(TARGETS))}")
    if data.pop("_partial_", None) or any(k.startswith("_") for k in data):
        raise ValueError(f"_target_ {target!r}: keys starting with '_' are not allowed "
                         f"({sorted(k for k in data if k.startswith('_'))})")
    module_name, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"_target_ {target!r} cannot be imported: {err}") from err
    return fn, data


def check_target_signature(node, provided: tuple[str, ...] = (), section: str | None = None) -> None:
    """Bind a `_target_` node's keys (plus arguments the pipeline provides) to the callable's signature and check
    plain values against its annotations. `section`: the config section the node is, to name keys with."""
    fn, kwargs = resolve_target(node)
    try:
        inspect.signature(fn).bind_partial(**kwargs, **{k: None for k in provided})
    except TypeError as err:
        raise ValueError(f"_target_ {fn.__module__}.{fn.__qualname__} does not accept {sorted(kwargs)}: {err}") \
            from err
    hints = typing.get_type_hints(fn)
    for key, value in kwargs.items():
        if key in hints and not _matches(value, hints[key]):
            name = f"{section}.{key}" if section else key
            raise ValueError(f"{name} = {value!r} has the wrong type for {fn.__qualname__} (expects "
                             f"{_type_name(hints[key])})")


def target_arguments(node) -> tuple[str, dict]:
    """(target path, its keyword arguments with the callable's defaults filled in) for a checked `_target_` node."""
    fn, kwargs = resolve_target(node)
    bound = inspect.signature(fn).bind_partial(**kwargs)
    bound.apply_defaults()
    return f"{fn.__module__}.{fn.__qualname__}", dict(bound.arguments)


_PLAIN = (str, int, float, bool, type(None))


def _matches(value, hint) -> bool:
    """True when `value` fits `hint`; hints other than plain scalars (and unions of them) are not checked."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not all(o in _PLAIN or o is Path for o in options):
        return True
    if isinstance(value, bool):
        return bool in options
    if isinstance(value, int) and (int in options or float in options):
        return True
    return any(isinstance(value, str if o is Path else o) for o in options)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def schema_fields(schema: type) -> list[str]:
    return [f.name for f in fields(schema)]
