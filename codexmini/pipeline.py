"""Run a recipe: thread the model through its stages, one folder and one manifest per stage, resumable.

    runs/<recipe>/<run_name>/
        config.yaml             the resolved run config
        00-init/                the student as built (HF folder + manifest.json)
        01-distill/             each stage: HF folder (config.json, model.safetensors, tokenizer), manifest.json,
                                checkpoints/step_N/ while training, metrics.jsonl
        ...

A stage folder is complete only once its manifest.json exists (written last, atomically). Re-running the same
command skips complete stages whose key (stage config + input model hash) is unchanged and resumes a stage that
was interrupted from its latest step checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .config import check_target_signature, instantiate
from .data import DataConfig, build_data, perplexity
from .distill import DistillConfig, TrainerConfig, distill
from .distill.attention_transfer import TransferConfig, attention_transfer
from .files import sha256_file, write_atomic
from .models import CodexMiniConfig, CodexMiniForCausalLM
from .models.from_teacher import student_from_teacher
from .models.quantized import weight_count
from .prune.depth import select_layers
from .prune.width import PruneConfig, check_config, prune
from .quantize.apply import QuantizeConfig, plan, quantize_model
from .quantize.apply import check_config as check_quantize_config
from .quantize.qat import fake_quantized

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- files
def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def save_model_folder(model, tokenizer, folder: Path) -> dict:
    """Save an HF folder atomically (into a temp folder, then moved in file by file) and hash its files."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".save."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        hashes = {}
        for f in sorted(tmp.iterdir()):
            hashes[f.name] = sha256_file(f)
            os.replace(f, folder / f.name)
        return hashes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict:
    import accelerate
    import transformers

    return {"codexmini": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------- teachers and students
def tiny_random_teacher(data: DataConfig | dict | None = None, hidden_size: int = 64, num_hidden_layers: int = 4,
                        num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
                        vocab_size: int = 512, pretrain_steps: int = 0, seed: int = 0):
    """A tiny random Llama teacher made on the fly, with a byte-level BPE trained on the run's corpus.

    `pretrain_steps` > 0 trains it briefly with cross-entropy first, so that distilling from it means something.
    Returns (model, tokenizer) like `load_teacher`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from .data import load_documents, split_documents, train_bpe_tokenizer

    data = DataConfig(**data) if isinstance(data, dict) else (data or DataConfig(max_files=20))
    train_docs, _ = split_documents(load_documents(data), data)
    tokenizer = train_bpe_tokenizer(train_docs["text"], vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                      intermediate_size=intermediate_size, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if pretrain_steps:
        # Pretrain as a CodexMini twin (same function, see student_from_teacher) and copy the weights back.
        twin = student_from_teacher(model)
        bundle = build_data(data, tokenizer)
        twin, _ = distill(twin, None, bundle.train, bundle.val, DistillConfig(kd_ratio=0.0),
                          TrainerConfig(max_steps=pretrain_steps, batch_size=8, lr=3e-3, warmup_steps=5,
                                        eval_every=pretrain_steps, checkpoint_every=10 ** 9, seed=seed))
        model.load_state_dict(twin.state_dict(), strict=False)
    return model.eval().requires_grad_(False), tokenizer


def build_student(cfg: DictConfig, teacher, tokenizer, calibration=None) -> CodexMiniForCausalLM:
    m = cfg.model
    if m.init == "from_teacher":
        types = list(m.layer_types) if m.layer_types is not None else None
        layers = list(m.layers) if m.layers is not None else None
        if m.keep_layers is not None:
            if layers is not None:
                raise ValueError("set model.layers or model.keep_layers, not both")
            layers = select_layers(teacher, calibration, m.keep_layers)
            print(f"[codexmini] kept teacher layers by block influence: {layers}", flush=True)
        student = student_from_teacher(teacher, layers, types,
                                       feature_map=m.feature_map, sliding_window=m.sliding_window,
                                       linear_decay=m.linear_decay, linear_chunk_size=m.linear_chunk_size)
        return student.float().train()
    if m.init == "folder":
        if not m.path or not Path(m.path).is_dir():
            raise FileNotFoundError(f"model.path {m.path!r} is not a folder (model.init=folder)")
        return CodexMiniForCausalLM.from_pretrained(m.path).float()
    if m.init == "scratch":
        n = m.num_hidden_layers
        config = CodexMiniConfig(
            vocab_size=len(tokenizer), hidden_size=m.hidden_size, num_hidden_layers=n,
            num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
            intermediate_size=m.intermediate_size, head_dim=m.head_dim, layer_types=list(m.layer_types or
                                                                                        ["softmax"] * n),
            feature_map=m.feature_map, sliding_window=m.sliding_window, linear_decay=m.linear_decay,
            linear_chunk_size=m.linear_chunk_size, tie_word_embeddings=m.tie_word_embeddings,
            embedding_rank=m.embedding_rank, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(cfg.seed)
        return CodexMiniForCausalLM(config)
    raise ValueError(f"model.init {m.init!r} is not one of from_teacher, scratch, folder")


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


# --------------------------------------------------------------------------- stages
def _stage_distill(model, cfg: DictConfig, ctx: Context, folder: Path):
    dcfg = DistillConfig(**OmegaConf.to_container(cfg.distill))
    tcfg = TrainerConfig(**OmegaConf.to_container(cfg.trainer))
    teacher = ctx.teacher if dcfg.kd_ratio > 0 or dcfg.hidden_weight > 0 else None
    if not dcfg.fake_quant:
        return distill(model, teacher, ctx.data.train, ctx.data.val, dcfg, tcfg, workdir=folder,
                       tokenizer=ctx.tokenizer)
    schemes = plan(model, QuantizeConfig(**OmegaConf.to_container(cfg.quantize)))
    with fake_quantized(model, schemes):
        model, metrics = distill(model, teacher, ctx.data.train, ctx.data.val, dcfg, tcfg, workdir=folder,
                                 tokenizer=ctx.tokenizer)
        # Perplexity as the quantize stage will see it (the fake-quantized weights), before they are removed.
        metrics["val_ppl_fake_quant"] = perplexity(model, ctx.data.val, batch_size=8)["ppl"]
    return model, {**metrics, "fake_quant_schemes": len(schemes)}


def _stage_quantize(model, cfg: DictConfig, ctx: Context, folder: Path):
    qcfg = QuantizeConfig(**OmegaConf.to_container(cfg.quantize))
    plan(model, qcfg)  # bad schemes or group sizes fail here, before the calibration passes
    before = perplexity(model, ctx.data.val, batch_size=8)["ppl"]
    model, report = quantize_model(model, qcfg, ctx.data.calibration)
    counts = dict(Counter(report["schemes"].values()))
    print(f"[codexmini] quantized {len(report['schemes'])} linear layers ({qcfg.method}: {counts}); "
          f"{report['bits_per_weight']:.2f} bits/weight", flush=True)
    return model, {"val_ppl_before": before, "quantize": report, "scheme_counts": counts}


def _stage_transfer(model, cfg: DictConfig, ctx: Context, folder: Path):
    tcfg = TransferConfig(**OmegaConf.to_container(cfg.transfer))
    return attention_transfer(model, ctx.data.train, ctx.data.val, tcfg)


def _stage_prune(model, cfg: DictConfig, ctx: Context, folder: Path):
    pcfg = PruneConfig(**OmegaConf.to_container(cfg.prune))
    check_config(pcfg, model.config)  # before any work: scoring needs calibration passes
    before = perplexity(model, ctx.data.val, batch_size=8)["ppl"]
    new, report = prune(model, pcfg, ctx.data.calibration)
    print(f"[codexmini] pruned {report['params_before']:,} -> {report['params_after']:,} parameters "
          f"({pcfg.criterion}); sizes {report['sizes']}", flush=True)
    return new, {"val_ppl_before": before, "prune": report}


def _stage_export(model, cfg: DictConfig, ctx: Context, folder: Path):
    from .export.gguf import write_llama_gguf
    from .export.to_cmx import ExportConfig, export_cmx
    from .runtime import Runtime, SamplingConfig
    from .runtime.bench import bench_context

    ecfg = ExportConfig(**OmegaConf.to_container(cfg.export))
    path = export_cmx(model, ctx.tokenizer, folder / "model.cmx", ecfg.dtype)
    # The shipped file must compute what the PyTorch model computes: compare logits on a validation block, with
    # fp32 activations (exact), then with the int kernels' fast inputs (int8 for cmx, bf16 for native: what users
    # run), prefill and token by token.
    ids = ctx.data.val[0, : ecfg.check_tokens]
    with torch.no_grad():
        want = model.eval()(input_ids=ids[None]).logits[0].float()
    diffs, nll = {}, {"pytorch": float(F.cross_entropy(want[:-1], ids[1:]))}
    for act in ("float32", "auto"):
        rt = Runtime(path, kernels=ecfg.kernels, act_dtype=act)
        s = rt.new_session()
        half = len(ids) // 2
        got = torch.cat([rt.forward(ids[:half], s, all_logits=True)]
                        + [rt.forward(ids[t:t + 1], s, all_logits=True) for t in range(half, len(ids))])
        diffs[act] = float((got - want).abs().max())
        nll[act] = float(F.cross_entropy(got[:-1], ids[1:]))
    max_diff = diffs["float32"]
    speed = bench_context(rt, ecfg.bench_context, ecfg.bench_decode_tokens)
    text = rt.generate(cfg.generate.prompt, SamplingConfig(max_tokens=cfg.generate.max_new_tokens))
    print(f"\n[codexmini] runtime sample ({path.name}, {speed['decode_tokens_per_s']:.1f} tok/s decode):\n"
          f"{cfg.generate.prompt}{text}\n", flush=True)
    metrics = {"file_bytes": path.stat().st_size, "cmx_sha256": sha256_file(path),
               "bits_per_weight": 8 * path.stat().st_size / weight_count(model),
               "runtime_max_abs_logit_diff": max_diff, "runtime_max_abs_logit_diff_fast_act": diffs["auto"],
               "runtime_act_dtype": rt.act_dtype, "check_nll": nll,
               "runtime_tokens_per_s": speed["decode_tokens_per_s"],
               "runtime_prefill_tokens_per_s": speed["prefill_tokens_per_s"], "runtime_ttft_s": speed["ttft_s"],
               "runtime_kernels": rt.kernels, "runtime_load_s": rt.load_seconds,
               "prompt": cfg.generate.prompt, "sample": text}
    if ecfg.gguf:
        c = model.config
        llama_shaped = (set(c.layer_types) == {"softmax"} and not c.quantization_scheme and not c.embedding_rank
                        and len(set(c.layer_num_attention_heads)) == 1 and len(set(c.layer_intermediate_sizes)) == 1)
        if llama_shaped:
            gguf_path = write_llama_gguf(model, ctx.tokenizer, folder / "model.gguf")
            metrics["gguf_bytes"] = Path(gguf_path).stat().st_size
        else:
            metrics["gguf_skipped"] = "not llama-shaped (needs all-softmax, float, uniform layer sizes)"
    return model, metrics


def _stage_eval(model, cfg: DictConfig, ctx: Context, folder: Path):
    return model, {}


def _stage_generate(model, cfg: DictConfig, ctx: Context, folder: Path):
    tok = ctx.tokenizer
    ids = tok(cfg.generate.prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    out = model.eval().generate(ids, max_new_tokens=cfg.generate.max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    secs = time.perf_counter() - t0
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\n[codexmini] sample ({folder.name}):\n{cfg.generate.prompt}{text}\n", flush=True)
    return model, {"prompt": cfg.generate.prompt, "sample": text,
                   "generate_tokens_per_s": (out.shape[1] - ids.shape[1]) / secs}


# name -> (function, produces a new model, config sections its key depends on)
STAGES: dict[str, tuple[Any, bool, tuple[str, ...]]] = {
    "transfer": (_stage_transfer, True, ("transfer", "data")),
    "distill": (_stage_distill, True, ("distill", "trainer", "data", "teacher")),
    "prune": (_stage_prune, True, ("prune", "data")),
    "quantize": (_stage_quantize, True, ("quantize", "data")),
    "export": (_stage_export, False, ("export", "generate", "data")),
    "eval": (_stage_eval, False, ("data",)),
    "generate": (_stage_generate, False, ("generate",)),
}


# --------------------------------------------------------------------------- the run
def run_dir_for(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / cfg.recipe / cfg.run_name


def validate(cfg: DictConfig) -> list[str]:
    """Check a composed run config without running anything; returns the problems found (empty = valid)."""
    problems = []
    try:
        check_target_signature(cfg.teacher)
    except ValueError as err:
        problems.append(f"teacher: {err}")
    if not cfg.stages:
        problems.append("stages: the recipe lists no stages")
    for i, spec in enumerate(cfg.stages):
        if spec.stage not in STAGES:
            problems.append(f"stages[{i}].stage {spec.stage!r} is not one of {sorted(STAGES)}")
        try:
            _stage_config(cfg, spec)
        except Exception as err:  # noqa: BLE001 - any bad override is reported, with its key
            problems.append(f"stages[{i}].overrides: {err}")
    if cfg.model.init == "folder" and not (cfg.model.path and Path(cfg.model.path).is_dir()):
        problems.append(f"model.path {cfg.model.path!r} is not a folder (model.init=folder)")
    if cfg.data.source != "stdlib":
        from .data import source_files

        try:
            source_files(DataConfig(**OmegaConf.to_container(cfg.data)))
        except FileNotFoundError as err:
            problems.append(f"data.source: {err}")
    try:
        from .distill.loop import check_configs

        check_configs(DistillConfig(**OmegaConf.to_container(cfg.distill)),
                      TrainerConfig(**OmegaConf.to_container(cfg.trainer)))
    except ValueError as err:
        problems.append(str(err))
    for i, spec in enumerate(cfg.stages):
        try:
            stage_cfg = _stage_config(cfg, spec)
        except Exception:  # noqa: BLE001 - a bad override is already reported above
            continue
        try:
            if spec.stage == "prune":
                check_config(PruneConfig(**OmegaConf.to_container(stage_cfg.prune)))
            if spec.stage == "quantize" or (spec.stage == "distill" and stage_cfg.distill.fake_quant):
                check_quantize_config(QuantizeConfig(**OmegaConf.to_container(stage_cfg.quantize)))
            if spec.stage == "export":
                from .export.to_cmx import ExportConfig, check_export_config

                check_export_config(ExportConfig(**OmegaConf.to_container(stage_cfg.export)))
        except (ValueError, KeyError) as err:
            problems.append(f"stages[{i}] ({spec.stage}): {err}")
    return problems


def _stage_config(cfg: DictConfig, spec) -> DictConfig:
    """The run config with this stage's overrides applied (typed: a bad key or type raises)."""
    stage_cfg = cfg.copy()
    for key, value in (spec.overrides or {}).items():
        if OmegaConf.select(stage_cfg, key, default="__missing__") == "__missing__":
            raise KeyError(f"override key {key!r} does not exist in the run config")
        OmegaConf.update(stage_cfg, key, value, merge=True)
    return stage_cfg


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
    if folder is not None and (folder / "model.safetensors").is_file():
        size = (folder / "model.safetensors").stat().st_size
        out.update(file_bytes=size, bits_per_weight=8 * size / out["parameters"])
    return out


def run(cfg: DictConfig, ctx: Context | None = None) -> Path:
    """Run (or resume) every stage of a composed recipe; returns the run folder."""
    problems = validate(cfg)
    if problems:
        raise ValueError("invalid recipe:\n  " + "\n  ".join(problems))
    torch.manual_seed(cfg.seed)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    ctx = ctx or Context(cfg)

    # Stage 00: the student as built.
    init_dir = run_dir / "00-init"
    init_cfg = {"model": OmegaConf.to_container(cfg.model), "teacher": OmegaConf.to_container(cfg.teacher),
                "seed": cfg.seed}
    init_key = _key(init_cfg)
    manifest = read_manifest(init_dir)
    if manifest is None or manifest["key"] != init_key:
        shutil.rmtree(init_dir, ignore_errors=True)
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
        fn, produces_model, sections = STAGES[spec.stage]
        stage_cfg = _stage_config(cfg, spec)
        if spec.stage == "distill" and stage_cfg.distill.fake_quant:
            sections = (*sections, "quantize")
        folder = run_dir / f"{i:02d}-{spec.name or spec.stage}"
        input_hash = read_manifest(model_dir)["outputs"].get("model.safetensors")
        key = _stage_key(stage_cfg, sections, spec, input_hash)
        manifest = read_manifest(folder)
        if manifest is not None and manifest["key"] == key:
            print(f"[codexmini] {folder.name}: complete, skipped", flush=True)
            if produces_model:
                model_dir = folder
            continue
        if manifest is not None:  # inputs or config changed: the old result is stale
            shutil.rmtree(folder)
        elif folder.exists() and not _resumable(folder, key):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "stage_key", key)
        t0 = time.perf_counter()
        print(f"[codexmini] {folder.name}: running {spec.stage}", flush=True)
        model = CodexMiniForCausalLM.from_pretrained(model_dir).float()
        model, metrics = fn(model, stage_cfg, ctx, folder)
        hashes = {}
        if produces_model:
            hashes = save_model_folder(model, ctx.tokenizer, folder)
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the final model supersedes them
        # The model's own numbers (perplexity of the saved weights, size of the saved file) override what the stage
        # reported under the same names; a stage that saves no model keeps its own file numbers (the .cmx export).
        metrics.update(_model_metrics(model, folder if produces_model else None, ctx))
        config_used = {s: OmegaConf.to_container(stage_cfg[s], resolve=True) for s in sections}
        _write_manifest(folder, spec.stage, spec.name or spec.stage, key, config_used,
                        {"model_dir": str(model_dir), "sha256": input_hash}, metrics, hashes, t0)
        print(f"[codexmini] {folder.name}: val ppl {metrics['val_ppl']:.3f}", flush=True)
        if produces_model:
            model_dir = folder
    return run_dir


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
