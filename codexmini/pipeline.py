"""Run a recipe: thread the model through its stages, one folder and one manifest per stage, resumable.

    runs/<recipe>/<run_name>/
        config.yaml             the resolved run config
        00-init/                the student as built (HF folder + manifest.json)
        01-distill/             each stage: HF folder (config.json, model.safetensors, tokenizer), manifest.json,
                                checkpoints/step_N/ while training, metrics.jsonl
        ...

Any registered stage runs here (`codexmini.stages`); this module knows none of them by name. A stage folder is
complete only once its manifest.json exists (written last, atomically). Re-running the same command skips complete
stages whose key (the stage's config sections + input model hash) is unchanged and whose files still match the
hashes their manifest records, and resumes an interrupted stage from its latest step checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, fields, is_dataclass
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from . import stages as registry
from .config import (ARCH_FIELDS, MODEL_INITS, ModelConfig, SCRATCH_FIELDS, TARGET_ARCHITECTURES, TARGET_CHECKS,
                     check_target_signature, groups, instantiate, target_arguments, unknown_keys)
from .data import DataConfig, build_data, check_data_config, evaluate_domains, perplexity
from .errors import RunLocked, StageFailed
from .files import no_space_error, sha256_file, staged_folder, write_atomic
from .models import CodexMiniConfig, CodexMiniForCausalLM
from .models.from_teacher import student_config_from_teacher, student_from_teacher
from .models.quantized import weight_count
from .ops.names import FEATURE_MAPS, LAYER_TYPES
from .prune.depth import select_layers
from .prune.width import uniform_sizes
from .train import check_trainer_config
from .train.checkpoint import stale_checkpoint_temporaries
from .train.config import SEED_MAX, check_int

MANIFEST = "manifest.json"
# Run, recipe and stage folder names: one plain path component (no separators, no '..').
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# --------------------------------------------------------------------------- files
def read_manifest(folder: Path) -> dict | None:
    """A stage folder's manifest, None when there is none; a damaged one raises ValueError naming the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is damaged ({err}); delete that stage folder to redo the stage") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ValueError(f"{path} is not a codexmini manifest ({problem}); delete that stage folder to redo it")
    return manifest


def manifest_problem(manifest, complete: bool = False) -> str | None:
    """What is wrong with a parsed manifest's structure (what the pipeline and the report rely on), or None.
    `complete`: also require what every manifest the pipeline writes has (its outputs and metrics)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("key"), str):
        return "no 'key' string"
    missing = [k for k in ("outputs", "metrics") if complete and k not in manifest]
    if missing:
        return f"no {' or '.join(repr(k) for k in missing)}"
    outputs = manifest.get("outputs", {})
    if not isinstance(outputs, dict):
        return "'outputs' is not an object"
    for name, digest in outputs.items():
        # Names of files inside the stage folder: never a path (a manifest must not point outside its folder).
        if not SAFE_NAME.match(name) or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return f"output {name!r} is not a file name with a sha256"
    metrics = manifest.get("metrics", {})
    if not isinstance(metrics, dict):
        return "'metrics' is not an object"
    # The numbers the run's report reads from every manifest.
    for key in REPORTED:
        value = manifest.get(key) if key == "wall_time_s" else metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} {value!r} is not a number"
    for key in ("sample", "prompt"):
        if metrics.get(key) is not None and not isinstance(metrics[key], str):
            return f"metrics.{key} is not a string"
    for key in ("domains", "teacher_domains"):  # per-domain numbers: {domain: {"ppl": ..., "kl": ...}}
        value = metrics.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(d, dict) for d in value.values()):
            return f"metrics.{key} is not an object of domains"
        for d in value.values():
            if any(d.get(k) is not None and (isinstance(d[k], bool) or not isinstance(d[k], (int, float)))
                   for k in ("ppl", "kl")):
                return f"metrics.{key} holds a perplexity or KL that is not a number"
    return None


# Numbers of a manifest that `codexmini report` tabulates (all but wall_time_s are under "metrics").
REPORTED = ("parameters", "file_bytes", "bits_per_weight", "val_ppl", "teacher_val_ppl", "runtime_tokens_per_s",
            "generate_tokens_per_s", "wall_time_s")


def stage_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for a stage folder with a sound manifest; (None, why) when it is missing or damaged.

    The pipeline redoes a stage whose manifest cannot be trusted rather than stopping: everything the manifest
    vouches for (the key and the outputs' hashes) is what it cannot read.
    """
    try:
        manifest = read_manifest(folder)
    except ValueError as err:
        return None, str(err).split("; delete")[0]
    except OSError as err:
        return None, f"{Path(folder) / MANIFEST} cannot be read ({err})"
    if manifest is None:
        return None, "no manifest"
    problem = manifest_problem(manifest, complete=True)
    if problem:
        return None, f"{Path(folder) / MANIFEST} is not a complete codexmini manifest ({problem})"
    return manifest, None


def save_model_folder(model, tokenizer, folder: Path) -> dict:
    """Save an HF folder atomically (into a staged folder, then moved in file by file) and hash its files."""
    with staged_folder(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}


def versions() -> dict:
    import accelerate
    import transformers

    return {"codexmini": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def _remove(path: Path, run_dir: Path) -> None:
    """Delete a stage folder, only ever inside the run folder."""
    path, root = Path(path).resolve(), Path(run_dir).resolve()
    if root not in path.parents:
        raise ValueError(f"refusing to delete {path}: it is outside the run folder {root}")
    shutil.rmtree(path, ignore_errors=True)


def _inside(folder: Path, run_dir: Path) -> Path:
    """`folder`, after checking that it is (resolved, links followed) a folder of the run: nothing is written
    elsewhere."""
    if Path(run_dir).resolve() not in Path(folder).resolve().parents:
        raise ValueError(f"refusing to write {folder}: it resolves to {Path(folder).resolve()}, outside the run "
                         f"folder {Path(run_dir).resolve()}")
    return folder


def _stale_temporaries(folder: Path) -> None:
    """Temporary files a killed process left behind (atomic writes, half-saved model folders)."""
    for p in folder.glob(".*"):
        if p.name.endswith(".tmp") or p.name.startswith((".save.", ".staged.")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _clean_run(run_dir: Path) -> None:
    """Stale temporaries of the run folder, of every stage folder and of their step checkpoints (a kill -9 during
    a save leaves full-size ones); the run is locked, so nothing is writing them."""
    _stale_temporaries(run_dir)
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        _stale_temporaries(folder)
        if (folder / "checkpoints").is_dir():
            stale_checkpoint_temporaries(folder / "checkpoints")


@contextmanager
def _locked(run_dir: Path):
    """An exclusive lock on the run folder: two processes never write the same run."""
    import fcntl

    lock_path = run_dir / ".lock"
    with open(lock_path, "a+", errors="replace") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            other = f.read().strip() or "another process"
            raise RunLocked(f"{run_dir} is in use by {other}; wait for it or pick another run_name=") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} ({' '.join(sys.argv[:3])})")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the student
def build_student(cfg: DictConfig, teacher, tokenizer, calibration=None) -> CodexMiniForCausalLM:
    m = cfg.model
    arch = {k: m[k] for k in ARCH_FIELDS if m[k] is not None}
    types = list(m.layer_types) if m.layer_types is not None else None
    if m.init == "from_teacher":
        layers = list(m.layers) if m.layers is not None else None
        if m.keep_layers is not None:
            if layers is not None:
                raise ValueError("set model.layers or model.keep_layers, not both")
            layers = select_layers(teacher, calibration, m.keep_layers)
            print(f"[codexmini] kept teacher layers by block influence: {layers}", flush=True)
        return student_from_teacher(teacher, layers, types, **arch).float().train()
    if m.init == "folder":
        if not m.path or not Path(m.path).is_dir():
            raise FileNotFoundError(f"model.path {m.path!r} is not a folder (model.init=folder)")
        return load_model_folder(Path(m.path), "model.path (model.init=folder): point it at an intact model "
                                               "folder, or save that model again")
    if m.init == "scratch":
        shape = {k: m[k] for k in SCRATCH_FIELDS if m[k] is not None}
        n = shape.get("num_hidden_layers", CodexMiniConfig().num_hidden_layers)
        config = CodexMiniConfig(vocab_size=len(tokenizer), layer_types=types or ["softmax"] * n, **shape, **arch,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(cfg.seed)
        return CodexMiniForCausalLM(config)
    raise ValueError(f"model.init {m.init!r} is not one of {', '.join(MODEL_INITS)}")


def load_model_folder(folder: Path, what_to_do: str) -> CodexMiniForCausalLM:
    """`from_pretrained` of a model folder (in fp32), with an error naming the damaged file instead of the
    library's (a truncated model.safetensors gives safetensors' own error without its path)."""
    try:
        return CodexMiniForCausalLM.from_pretrained(folder).float()
    except Exception as err:  # noqa: BLE001 - transformers and safetensors raise many types for damaged files
        raise StageFailed(f"cannot load the model in {folder}: {_folder_problem(folder) or err}; {what_to_do}") \
            from err


def _folder_problem(folder: Path) -> str | None:
    """Why a model folder cannot load, naming the file: a missing or unreadable config.json or weights file."""
    from .models.teacher import unreadable_weights

    config = folder / "config.json"
    if not config.is_file():
        return f"{config} is missing"
    try:
        CodexMiniConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - a damaged config.json
        return f"{config} cannot be read ({err})"
    if not any(folder.glob("*.safetensors")):
        return f"{folder} holds no model.safetensors"
    return unreadable_weights(folder)


def _weights_hash(folder: Path) -> str | None:
    """The hash of a model folder's weights (what keys a stage started from a folder outside the run)."""
    path = Path(folder) / "model.safetensors"
    return sha256_file(path) if path.is_file() else None


class Context:
    """What stages share in one process: the teacher (loaded once, lazily), the tokenizer and the data."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @cached_property
    def teacher_and_tokenizer(self):
        print(f"[codexmini] loading teacher ({self.cfg.teacher.get('_target_')})", flush=True)
        return instantiate(self.cfg.teacher)

    @property
    def teacher(self):
        return self.teacher_and_tokenizer[0]

    @property
    def tokenizer(self):
        return self.teacher_and_tokenizer[1]

    @cached_property
    def data(self):
        # The teacher is passed for sources it generates (source: teacher); it is loaded anyway for its tokenizer.
        return build_data(DataConfig(**OmegaConf.to_container(self.cfg.data, resolve=True)), self.tokenizer,
                          teacher=self.teacher)


# --------------------------------------------------------------------------- configs per stage
def _section(cfg: DictConfig, name: str):
    """A config section as the plain object a stage gets: its schema's dataclass (the teacher stays a dict)."""
    schema = groups().get(name)
    value = OmegaConf.to_container(cfg[name], resolve=True)
    if schema is None or not isinstance(value, dict):
        return value
    return _to_dataclass(schema, value)


def _to_dataclass(schema, value: dict):
    kwargs = {}
    for f in fields(schema):
        if f.name in value:
            v = value[f.name]
            inner = f.type if isinstance(f.type, type) else None
            kwargs[f.name] = _to_dataclass(inner, v) if inner is not None and is_dataclass(inner) and \
                isinstance(v, dict) else v
    return schema(**kwargs)


def _stage_config(cfg: DictConfig, spec, stage: registry.Stage | None = None) -> DictConfig:
    """The run config with this stage's overrides applied (typed: a bad key or type raises). With `stage`, an
    override of a section the stage does not read is refused too: it would be stored and ignored."""
    stage_cfg = cfg.copy() if spec.overrides else cfg  # read only: no copy needed without overrides
    for key, value in (spec.overrides or {}).items():
        if OmegaConf.select(stage_cfg, key, default="__missing__") == "__missing__":
            raise KeyError(f"override key {key!r} does not exist in the run config")
        OmegaConf.update(stage_cfg, key, value, merge=True)
    if stage is not None:
        own = _section(stage_cfg, stage.section_name) if stage.section_name else None
        reads = stage.sections(own)
        for key in spec.overrides or {}:
            top = str(key).split(".")[0]
            if top == "teacher":
                raise ValueError(f"override key {key!r}: the teacher is loaded once per run; set teacher.* for the "
                                 "whole run instead of one stage")
            if top not in (*reads, "seed"):
                raise ValueError(f"override key {key!r}: stage {spec.stage!r} does not read the {top!r} section "
                                 f"(it reads {', '.join(reads) or 'none'}), so the override would do nothing")
    return stage_cfg


def stage_context(stage: registry.Stage, stage_cfg: DictConfig, folder: Path | None, shared=None, index: int = 0):
    """The stage's own config (its dataclass) and its context with the sections it uses."""
    own = _section(stage_cfg, stage.section_name) if stage.section_name else None
    used = {s: _section(stage_cfg, s) for s in stage.sections(own) if s != stage.section_name}
    return own, registry.StageContext(folder=folder, seed=stage_cfg.seed, _configs=used, _shared=shared,
                                      index=index)


# --------------------------------------------------------------------------- validate
def validate(cfg: DictConfig) -> list[str]:
    """Check a composed run config without running anything; returns the problems found (empty = valid).

    One line per problem, naming its key: keys no schema has (Hydra's `+key` adds them past the schema), the
    teacher's target, its arguments and its path, the run's names, every value of the run's own sections
    (`model`, `trainer`, `generate`, `data`), each listed stage's settings with its per-stage overrides, and
    what depends on the teacher's shape (read without its weights: the layers a student keeps, the sizes pruning
    leaves, group sizes against the widths they quantize), so a bad value fails here and not minutes into a run.
    """
    problems = list(unknown_keys(cfg))
    teacher_arch = None
    try:
        check_target_signature(cfg.teacher, section="teacher")
        target, kwargs = target_arguments(cfg.teacher)
    except ValueError as err:
        problems.append(f"teacher: {err}")
    else:
        try:
            if target in TARGET_CHECKS:
                TARGET_CHECKS[target](kwargs)
            if target in TARGET_ARCHITECTURES:
                teacher_arch = TARGET_ARCHITECTURES[target](kwargs)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err) if str(err).startswith("teacher") else f"teacher: {err}")
    for key in ("recipe", "run_name"):
        if not SAFE_NAME.match(str(cfg[key])) or ".." in str(cfg[key]):
            problems.append(f"{key} {cfg[key]!r} must be a plain name (letters, digits, '_', '-', '.'; no '/' "
                            "or '..')")
    base = _base_problems(cfg)
    problems += base
    student, model_problems = _student_config(cfg, teacher_arch)
    problems += model_problems
    if not cfg.stages:
        problems.append("stages: the recipe lists no stages")
    known = registry.stages()
    for i, spec in enumerate(cfg.stages):
        if spec.name is not None and (not SAFE_NAME.match(spec.name) or ".." in spec.name):
            problems.append(f"stages[{i}].name {spec.name!r} must be a plain name (letters, digits, '_', '-', "
                            "'.'; no '/' or '..')")
        if spec.stage not in known:
            try:
                registry.get(spec.stage)
            except KeyError as err:
                problems.append(f"stages[{i}].{err.args[0]}")
            continue
        stage = known[spec.stage]
        try:
            stage_cfg = _stage_config(cfg, spec, stage)
        except Exception as err:  # noqa: BLE001 - any bad override is reported, with its key
            problems.append(f"stages[{i}].overrides: {err.args[0] if isinstance(err, KeyError) else err}")
            continue
        try:
            own, ctx = stage_context(stage, stage_cfg, None)
            if stage.check is not None:
                stage.check(own, ctx)
        except (ValueError, KeyError, TypeError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            if message not in base:  # a bad run-level value is reported once, not once per stage using it
                problems.append(f"stages[{i}] ({spec.stage}): {message}")
        if spec.overrides:  # what an override sets in a run-level section (data.*, trainer.*, ...) is checked too
            problems += [f"stages[{i}] ({spec.stage}): {p}" for p in _base_problems(stage_cfg) if p not in base]
    if student is not None:
        problems += _shape_problems(cfg, student)
    return list(dict.fromkeys(problems))


def _base_problems(cfg: DictConfig) -> list[str]:
    """The run's own sections, checked whether or not a stage reads them (a bad value is a bad value)."""
    out = []
    try:
        check_int("seed", cfg.seed, low=0, high=SEED_MAX)
    except ValueError as err:
        out.append(str(err))
    try:
        check_trainer_config(_section(cfg, "trainer"))
    except ValueError as err:
        out.append(str(err))
    gen = cfg.generate
    try:
        check_int("generate.max_new_tokens", gen.max_new_tokens, low=1)
    except ValueError as err:
        out.append(str(err))
    if not isinstance(gen.prompt, str) or not gen.prompt:
        out.append("generate.prompt must be a non-empty string (the run's sample continues it)")
    out += _data_problems(cfg)
    # Each registered stage's own section as the run sets it (listed stages are checked again with their
    # per-stage overrides): a bad value there is refused even where a recipe's stage overrides it.
    for name, stage in sorted(registry.stages().items()):
        if stage.check is None or stage.section_name is None or stage.section_name not in cfg:
            continue
        try:
            own, ctx = stage_context(stage, cfg, None)
            stage.check(own, ctx)
        except (ValueError, KeyError, TypeError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            if message not in out:  # a shared section's value (trainer.*) is reported once
                out.append(message if message.startswith(f"{stage.section_name}.") else f"{name}: {message}")
    return list(dict.fromkeys(out))


def _data_problems(cfg: DictConfig) -> list[str]:
    """The data section, by its package's own check (paths, columns, formats, sizes)."""
    out = []
    try:
        check_data_config(_section(cfg, "data"))
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        out.append(message if message.startswith("data") else f"data.source: {message}")
    return out


def _model_problems(m) -> list[str]:
    """The model section's own values (each alone; the shapes they make together are checked after)."""
    out = []
    if m.init not in MODEL_INITS:
        return [f"model.init {m.init!r} is not one of {', '.join(MODEL_INITS)}"]
    for name in ("sliding_window", "linear_chunk_size", "keep_layers", *SCRATCH_FIELDS):
        value = m[name]
        if value is not None and name != "tie_word_embeddings":
            try:
                check_int(f"model.{name}", value, low=1)
            except ValueError as err:
                out.append(str(err))
    if m.head_dim is not None and isinstance(m.head_dim, int) and m.head_dim % 2:
        out.append(f"model.head_dim must be even (RoPE rotates pairs of channels), got {m.head_dim}")
    if m.feature_map is not None and m.feature_map not in FEATURE_MAPS:
        out.append(f"model.feature_map {m.feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
    for i, t in enumerate(m.layer_types or []):
        if t not in LAYER_TYPES:
            out.append(f"model.layer_types[{i}] {t!r} is not one of {', '.join(LAYER_TYPES)}")
    if m.layers is not None:
        if not len(m.layers):
            out.append("model.layers is empty: keep at least one teacher layer (or null for all)")
        for i, layer in enumerate(m.layers):
            try:
                check_int(f"model.layers[{i}]", layer, low=0)
            except ValueError as err:
                out.append(str(err))
        if len(set(m.layers)) != len(m.layers):
            out.append(f"model.layers {list(m.layers)} lists a teacher layer twice")
        if m.keep_layers is not None:
            out.append("set model.layers or model.keep_layers, not both")
    if m.init == "folder":
        if not m.path or not Path(m.path).is_dir():
            out.append(f"model.path {m.path!r} is not a folder (model.init=folder)")
        else:
            problem = _folder_problem(Path(m.path))
            if problem:
                out.append(f"model.path: {problem}")
    return out


def _student_config(cfg: DictConfig, teacher_arch) -> tuple[CodexMiniConfig | None, list[str]]:
    """The student's config as `build_student` will make it, without weights (None where it depends on what
    only running shows: a hub teacher, layers chosen by block influence in a heterogeneous teacher), and the
    model section's problems."""
    m = cfg.model
    out = _model_problems(m)
    if out:
        return None, out
    arch = {k: m[k] for k in ARCH_FIELDS if m[k] is not None}
    types = list(m.layer_types) if m.layer_types is not None else None
    try:
        if m.init == "folder":
            return CodexMiniConfig.from_pretrained(m.path), out
        if m.init == "scratch":
            shape = {k: m[k] for k in SCRATCH_FIELDS if m[k] is not None}
            n = shape.get("num_hidden_layers", CodexMiniConfig().num_hidden_layers)
            if types is not None and len(types) != n:
                return None, [f"model.layer_types has {len(types)} entries for the student's {n} layers "
                              "(model.num_hidden_layers)"]
            vocab = teacher_arch.vocab_size if teacher_arch is not None else CodexMiniConfig().vocab_size
            return CodexMiniConfig(vocab_size=vocab, layer_types=types or ["softmax"] * n, **shape, **arch), out
        if teacher_arch is None:
            return None, out
        n_teacher = teacher_arch.num_hidden_layers
        if m.layers is not None:
            bad = [i for i in m.layers if i >= n_teacher]
            if bad:
                return None, [f"model.layers {bad} are outside the teacher's {n_teacher} layers (0..{n_teacher - 1})"]
            layers = list(m.layers)
        elif m.keep_layers is not None:
            if m.keep_layers > n_teacher:
                return None, [f"model.keep_layers = {m.keep_layers}, but the teacher has {n_teacher} layers"]
            layers = list(range(m.keep_layers))  # which ones is chosen by block influence while running
        else:
            layers = list(range(n_teacher))
        if types is not None and len(types) != len(layers):
            return None, [f"model.layer_types has {len(types)} entries for the student's {len(layers)} layers"]
        student = student_config_from_teacher(teacher_arch, layers, types, **arch)
    except (ValueError, TypeError, OSError) as err:
        # The model config names its own fields; in a run config they are model.* keys.
        names = "|".join(f.name for f in fields(ModelConfig))
        return None, [re.sub(rf"(?<![\w.])({names})\b", r"model.\1", str(err))]
    if m.keep_layers is not None and not uniform_sizes(student_config_from_teacher(teacher_arch)):
        return None, out  # the kept layers' sizes differ by which layers block influence picks
    return student, out


def _shape_problems(cfg: DictConfig, student: CodexMiniConfig) -> list[str]:
    """Follow the student's config through the listed stages with each stage's `shapes` hook, as far as it is
    known before running, and collect what the stages find against it (a group size that does not divide a width
    fails here with `on_bad_group=error`)."""
    out, config = [], student
    known = registry.stages()
    for i, spec in enumerate(cfg.stages):
        stage = known.get(spec.stage)
        if stage is None or config is None:
            break
        try:
            stage_cfg = _stage_config(cfg, spec, stage)
            own, ctx = stage_context(stage, stage_cfg, None)
        except Exception:  # noqa: BLE001 - reported by validate already
            break
        if stage.shapes is not None:
            config, problems = stage.shapes(own, ctx, config)
            out += [f"stages[{i}] ({spec.stage}): {p}" for p in problems]
    return out


# --------------------------------------------------------------------------- the run
def run_dir_for(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / cfg.recipe / cfg.run_name


def _stage_key(stage_cfg: DictConfig, sections: tuple[str, ...], spec, input_hash: str | None) -> str:
    payload = {s: OmegaConf.to_container(stage_cfg[s], resolve=True) for s in sections}
    payload.update(stage=spec.stage, input=input_hash, seed=stage_cfg.seed)
    return _key(payload)


def _key(payload: dict) -> str:
    """A short, stable hash of a JSON-able payload: what decides whether a stage is still up to date."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_metrics(model, folder: Path | None, ctx: Context) -> dict:
    ppl = perplexity(model, ctx.data.val, batch_size=8)
    out = {"val_ppl": ppl["ppl"], "val_loss": ppl["loss"], "parameters": weight_count(model)}
    if len(ctx.data.val_domains) > 1:
        # Several domains (a mixture, or eval-only domains): perplexity and KL from the teacher on each, so the
        # report shows what the student forgets outside its training data.
        out["domains"] = evaluate_domains(model, ctx.data, teacher=ctx.teacher)
    if folder is not None:
        out.update(_file_metrics(folder, out["parameters"]))
    return out


def _file_metrics(folder: Path, parameters: int) -> dict:
    path = folder / "model.safetensors"
    if not path.is_file():
        return {}
    size = path.stat().st_size
    return {"file_bytes": size, "bits_per_weight": 8 * size / parameters}


def _intact(folder: Path, manifest: dict) -> str | None:
    """None when every output file the manifest records is there with its hash; else what is wrong."""
    for name, digest in (manifest.get("outputs") or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} does not match the hash its manifest records (changed or damaged)"
    return None


def _check_finite(name: str, metrics: dict, keys=("val_ppl", "val_loss"),
                  why: str = "the stage diverged (check the learning rate, temperature and data)") -> None:
    """A stage whose metrics are NaN or infinite fails: it is not marked complete and nothing after it runs."""
    bad = [k for k in keys if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k])]
    if bad:
        raise StageFailed(f"{name}: {', '.join(f'{k} = {metrics[k]}' for k in bad)} - {why}; it is not marked "
                          "complete")


def run(cfg: DictConfig, ctx: Context | None = None) -> Path:
    """Run (or resume) every stage of a composed recipe; returns the run folder."""
    problems = validate(cfg)
    if problems:
        raise ValueError("invalid recipe:\n  " + "\n  ".join(problems))
    torch.manual_seed(cfg.seed)
    run_dir = run_dir_for(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with _locked(run_dir):
            return _run(cfg, run_dir, ctx or Context(cfg))
    except OSError as err:
        full = no_space_error(err, err.filename or run_dir)
        if full is None:
            raise
        where = str(full.strerror).split("; ")[0]
        raise OSError(errno.ENOSPC, f"{where}; free some space and run the same command again: it resumes where it "
                                    "stopped") from err


def _complete(folder: Path, key: str, model: bool = True) -> tuple[dict | None, str | None]:
    """(manifest, None) when `folder` holds a finished result for `key` whose files match their hashes (with a
    model.safetensors among them when the stage makes a model); (manifest or None, why not) otherwise."""
    manifest, problem = stage_manifest(folder)
    if manifest is None:
        return None, problem
    if manifest["key"] != key:
        return manifest, "its inputs or settings changed"
    if model and "model.safetensors" not in manifest.get("outputs", {}):
        return manifest, f"{folder / MANIFEST} lists no model.safetensors among its outputs"
    damage = _intact(folder, manifest)
    return (manifest, damage) if damage else (manifest, None)


def _run(cfg: DictConfig, run_dir: Path, ctx: Context) -> Path:
    _clean_run(run_dir)
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # Stage 00: the student as built.
    init_dir = _inside(run_dir / "00-init", run_dir)
    init_cfg = {"model": OmegaConf.to_container(cfg.model), "teacher": OmegaConf.to_container(cfg.teacher),
                "seed": cfg.seed}
    # A student loaded from a folder outside the run is keyed by that folder's weights, not only by its path.
    weights = _weights_hash(Path(cfg.model.path)) if cfg.model.init == "folder" else None
    init_key = _key({**init_cfg, "weights": weights} if weights else init_cfg)
    manifest, why = _complete(init_dir, init_key)
    if why is not None:
        if manifest is not None or why != "no manifest":
            print(f"[codexmini] 00-init: {why}; building the student again", flush=True)
        _remove(init_dir, run_dir)
        t0 = time.perf_counter()
        student = build_student(cfg, ctx.teacher, ctx.tokenizer, ctx.data.calibration)
        metrics = _model_metrics(student, None, ctx)
        teacher_ppl = perplexity(ctx.teacher, ctx.data.val, batch_size=8)
        metrics.update(teacher_val_ppl=teacher_ppl["ppl"], teacher_parameters=ctx.teacher.num_parameters(),
                       data=ctx.data.stats)
        if len(ctx.data.val_domains) > 1:
            metrics["teacher_domains"] = evaluate_domains(ctx.teacher, ctx.data)
        _check_finite("00-init", metrics, ("val_ppl", "val_loss", "teacher_val_ppl"),
                      "the student as built (or the teacher) computes non-finite values: its weights hold NaN or "
                      "infinities")
        hashes = save_model_folder(student, ctx.tokenizer, init_dir)
        metrics.update(_file_metrics(init_dir, metrics["parameters"]))
        _write_manifest(init_dir, "init", "init", init_key, init_cfg, None, metrics, hashes, t0)
        print(f"[codexmini] 00-init: student {metrics['parameters']:,} params, val ppl {metrics['val_ppl']:.2f} "
              f"(teacher {teacher_ppl['ppl']:.2f})", flush=True)
        manifest = read_manifest(init_dir)
    model_dir, model_manifest = init_dir, manifest

    for i, spec in enumerate(cfg.stages, start=1):
        stage = registry.get(spec.stage)
        stage_cfg = _stage_config(cfg, spec)
        own, _ = stage_context(stage, stage_cfg, None)
        sections = stage.sections(own)
        folder = _inside(run_dir / f"{i:02d}-{spec.name or spec.stage}", run_dir)
        input_hash = model_manifest["outputs"]["model.safetensors"]
        key = _stage_key(stage_cfg, sections, spec, input_hash)
        manifest, why = _complete(folder, key, stage.produces_model)
        if why is None:
            print(f"[codexmini] {folder.name}: complete, skipped", flush=True)
            if stage.produces_model:
                model_dir, model_manifest = folder, manifest
            continue
        if manifest is not None and why != "its inputs or settings changed":
            print(f"[codexmini] {folder.name}: {why}; redoing the stage", flush=True)
        elif manifest is None and why != "no manifest":
            print(f"[codexmini] {folder.name}: {why}; redoing the stage", flush=True)
        if manifest is not None or why != "no manifest":  # a stale, damaged or unreadable result: start over
            _remove(folder, run_dir)
        elif folder.exists() and not _resumable(folder, key):
            _remove(folder, run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _stale_temporaries(folder)
        write_atomic(folder / "stage_key", key)
        t0 = time.perf_counter()
        print(f"[codexmini] {folder.name}: running {spec.stage}", flush=True)
        own, sctx = stage_context(stage, stage_cfg, folder, shared=ctx, index=i)
        model = load_model_folder(model_dir, f"delete {model_dir} and re-run to redo that stage")
        model, metrics = stage.run(model, own, sctx)
        # The model's own numbers (perplexity of the weights, size of the saved file) override what the stage
        # reported under the same names; a stage that saves no model keeps its own file numbers (the .cmx export).
        metrics.update(_model_metrics(model, None, ctx))
        _check_finite(folder.name, metrics)
        hashes = {}
        if stage.produces_model:
            hashes = save_model_folder(model, ctx.tokenizer, folder)
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the final model supersedes them
            metrics.update(_file_metrics(folder, metrics["parameters"]))
        else:
            hashes = _hash_outputs(folder)
        config_used = {s: OmegaConf.to_container(stage_cfg[s], resolve=True) for s in sections}
        _write_manifest(folder, spec.stage, spec.name or spec.stage, key, config_used,
                        {"model_dir": str(model_dir), "sha256": input_hash}, metrics, hashes, t0)
        print(f"[codexmini] {folder.name}: val ppl {metrics['val_ppl']:.3f}", flush=True)
        if stage.produces_model:
            model_dir, model_manifest = folder, read_manifest(folder)
    return run_dir


# Files in a stage folder that are bookkeeping, not the stage's result.
BOOKKEEPING = {MANIFEST, "stage_key", "metrics.jsonl", ".lock"}


def _hash_outputs(folder: Path) -> dict:
    """Hashes of the files a stage that saves no model left in its folder (the .cmx export, a GGUF file)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in BOOKKEEPING and not p.name.startswith(".")}


def _resumable(folder: Path, key: str) -> bool:
    """An incomplete stage folder is resumed only if it was started for the same key."""
    marker = folder / "stage_key"
    return marker.is_file() and marker.read_bytes() == key.encode()


def _write_manifest(folder: Path, stage: str, name: str, key: str, config: dict, inputs, metrics: dict,
                    hashes: dict, t0: float) -> None:
    manifest = {
        "stage": stage, "name": name, "key": key, "config": config, "inputs": inputs,
        "metrics": {k: v for k, v in metrics.items() if k != "loss_curve"}, "wall_time_s": time.perf_counter() - t0,
        "versions": versions(), "outputs": hashes, "argv": sys.argv,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Written last: a stage folder counts as complete only once this file exists.
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, default=_json_default))


def _json_default(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)
