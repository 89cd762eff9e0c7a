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
from .config import ARCH_FIELDS, MODEL_INITS, SCRATCH_FIELDS, check_target_signature, groups, instantiate
from .data import DataConfig, build_data, perplexity
from .errors import RunLocked, StageFailed
from .files import sha256_file, staged_folder, write_atomic
from .models import CodexMiniConfig, CodexMiniForCausalLM
from .models.from_teacher import student_from_teacher
from .models.quantized import weight_count
from .prune.depth import select_layers

MANIFEST = "manifest.json"
# Run, recipe and stage folder names: one plain path component (no separators, no '..').
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# --------------------------------------------------------------------------- files
def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); delete that stage folder to redo the stage") from None
    if not isinstance(manifest, dict) or "key" not in manifest:
        raise ValueError(f"{path} is not a codexmini manifest (no 'key'); delete that stage folder to redo it")
    return manifest


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


def _stale_temporaries(folder: Path) -> None:
    """Temporary files a killed process left behind (atomic writes, half-saved model folders)."""
    for p in folder.glob(".*"):
        if p.name.endswith(".tmp") or p.name.startswith((".save.", ".staged.")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextmanager
def _locked(run_dir: Path):
    """An exclusive lock on the run folder: two processes never write the same run."""
    import fcntl

    lock_path = run_dir / ".lock"
    with open(lock_path, "a+") as f:
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
        return CodexMiniForCausalLM.from_pretrained(m.path).float()
    if m.init == "scratch":
        shape = {k: m[k] for k in SCRATCH_FIELDS if m[k] is not None}
        n = shape.get("num_hidden_layers", CodexMiniConfig().num_hidden_layers)
        config = CodexMiniConfig(vocab_size=len(tokenizer), layer_types=types or ["softmax"] * n, **shape, **arch,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(cfg.seed)
        return CodexMiniForCausalLM(config)
    raise ValueError(f"model.init {m.init!r} is not one of {', '.join(MODEL_INITS)}")


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
        return build_data(DataConfig(**OmegaConf.to_container(self.cfg.data)), self.tokenizer)


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


def _stage_config(cfg: DictConfig, spec) -> DictConfig:
    """The run config with this stage's overrides applied (typed: a bad key or type raises)."""
    stage_cfg = cfg.copy()
    for key, value in (spec.overrides or {}).items():
        if OmegaConf.select(stage_cfg, key, default="__missing__") == "__missing__":
            raise KeyError(f"override key {key!r} does not exist in the run config")
        OmegaConf.update(stage_cfg, key, value, merge=True)
    return stage_cfg


def stage_context(stage: registry.Stage, stage_cfg: DictConfig, folder: Path | None, shared=None):
    """The stage's own config (its dataclass) and its context with the sections it uses."""
    own = _section(stage_cfg, stage.section_name) if stage.section_name else None
    used = {s: _section(stage_cfg, s) for s in stage.sections(own) if s != stage.section_name}
    return own, registry.StageContext(folder=folder, seed=stage_cfg.seed, _configs=used, _shared=shared)


# --------------------------------------------------------------------------- validate
def validate(cfg: DictConfig) -> list[str]:
    """Check a composed run config without running anything; returns the problems found (empty = valid)."""
    problems = []
    try:
        check_target_signature(cfg.teacher)
    except ValueError as err:
        problems.append(f"teacher: {err}")
    for key in ("recipe", "run_name"):
        if not SAFE_NAME.match(str(cfg[key])) or ".." in str(cfg[key]):
            problems.append(f"{key} {cfg[key]!r} must be a plain name (letters, digits, '_', '-', '.'; no '/' "
                            "or '..')")
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
        try:
            stage_cfg = _stage_config(cfg, spec)
            stage = known[spec.stage]
            own, ctx = stage_context(stage, stage_cfg, None)
        except Exception as err:  # noqa: BLE001 - any bad override is reported, with its key
            problems.append(f"stages[{i}].overrides: {err}")
            continue
        if stage.check is not None:
            try:
                stage.check(own, ctx)
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"stages[{i}] ({spec.stage}): {err}")
    m = cfg.model
    if m.init not in MODEL_INITS:
        problems.append(f"model.init {m.init!r} is not one of {', '.join(MODEL_INITS)}")
    if m.init == "folder" and not (m.path and Path(m.path).is_dir()):
        problems.append(f"model.path {m.path!r} is not a folder (model.init=folder)")
    if cfg.data.source != "stdlib":
        from .data import source_files

        try:
            source_files(DataConfig(**OmegaConf.to_container(cfg.data)))
        except FileNotFoundError as err:
            problems.append(f"data.source: {err}")
    return list(dict.fromkeys(problems))


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


def _check_finite(name: str, metrics: dict) -> None:
    bad = [k for k in ("val_ppl", "val_loss") if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k])]
    if bad:
        raise StageFailed(f"{name}: {', '.join(f'{k} = {metrics[k]}' for k in bad)} - the stage diverged (check "
                          "the learning rate, temperature and data); it is not marked complete")


def run(cfg: DictConfig, ctx: Context | None = None) -> Path:
    """Run (or resume) every stage of a composed recipe; returns the run folder."""
    problems = validate(cfg)
    if problems:
        raise ValueError("invalid recipe:\n  " + "\n  ".join(problems))
    torch.manual_seed(cfg.seed)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(run_dir):
            return _run(cfg, run_dir, ctx or Context(cfg))
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(err.errno, f"no space left on device while writing {err.filename or run_dir}; free "
                                     "some space and re-run the same command to resume") from err
        raise


def _run(cfg: DictConfig, run_dir: Path, ctx: Context) -> Path:
    _stale_temporaries(run_dir)
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # Stage 00: the student as built.
    init_dir = run_dir / "00-init"
    init_cfg = {"model": OmegaConf.to_container(cfg.model), "teacher": OmegaConf.to_container(cfg.teacher),
                "seed": cfg.seed}
    init_key = _key(init_cfg)
    manifest = read_manifest(init_dir)
    if manifest is None or manifest["key"] != init_key or _intact(init_dir, manifest):
        _remove(init_dir, run_dir)
        t0 = time.perf_counter()
        student = build_student(cfg, ctx.teacher, ctx.tokenizer, ctx.data.calibration)
        hashes = save_model_folder(student, ctx.tokenizer, init_dir)
        metrics = _model_metrics(student, init_dir, ctx)
        teacher_ppl = perplexity(ctx.teacher, ctx.data.val, batch_size=8)
        metrics.update(teacher_val_ppl=teacher_ppl["ppl"], teacher_parameters=ctx.teacher.num_parameters(),
                       data=ctx.data.stats)
        _write_manifest(init_dir, "init", "init", init_key, init_cfg, None, metrics, hashes, t0)
        print(f"[codexmini] 00-init: student {metrics['parameters']:,} params, val ppl {metrics['val_ppl']:.2f} "
              f"(teacher {teacher_ppl['ppl']:.2f})", flush=True)
    model_dir = init_dir

    for i, spec in enumerate(cfg.stages, start=1):
        stage = registry.get(spec.stage)
        stage_cfg = _stage_config(cfg, spec)
        own, _ = stage_context(stage, stage_cfg, None)
        sections = stage.sections(own)
        folder = run_dir / f"{i:02d}-{spec.name or spec.stage}"
        input_hash = read_manifest(model_dir)["outputs"].get("model.safetensors")
        key = _stage_key(stage_cfg, sections, spec, input_hash)
        manifest = read_manifest(folder)
        if manifest is not None and manifest["key"] == key:
            damage = _intact(folder, manifest)
            if damage is None:
                print(f"[codexmini] {folder.name}: complete, skipped", flush=True)
                if stage.produces_model:
                    model_dir = folder
                continue
            print(f"[codexmini] {folder.name}: {damage}; redoing the stage", flush=True)
        if manifest is not None:  # inputs or config changed, or the files were damaged: the old result is stale
            _remove(folder, run_dir)
        elif folder.exists() and not _resumable(folder, key):
            _remove(folder, run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _stale_temporaries(folder)
        write_atomic(folder / "stage_key", key)
        t0 = time.perf_counter()
        print(f"[codexmini] {folder.name}: running {spec.stage}", flush=True)
        own, sctx = stage_context(stage, stage_cfg, folder, shared=ctx)
        model = CodexMiniForCausalLM.from_pretrained(model_dir).float()
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
            model_dir = folder
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
    return marker.is_file() and marker.read_text() == key


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
