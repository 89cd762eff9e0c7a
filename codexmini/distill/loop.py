"""The distillation loop: a student learns to match a teacher on token blocks, on accelerate.

The same code runs single-process on CPU or GPU and multi-process under `accelerate launch` / `torchrun`
(each process takes its own slice of every global batch). Checkpoints hold model, optimizer, scheduler, RNG and
the step, so a run interrupted at any point resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.perplexity import perplexity
from .hidden import HIDDEN_LOSSES, HiddenProjector, hidden_state_loss, layer_map
from .losses import LOSSES, chunked_kd_loss


@dataclass
class DistillConfig:
    """What the student learns from the teacher."""

    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl
    temperature: float = 1.0
    kd_ratio: float = 0.9  # weight of the KD term; the rest is next-token cross-entropy
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew_kl / skew_reverse_kl
    chunk_size: int = 128  # positions turned into logits at a time
    # Hidden-state matching (added to the loss with this weight; 0 = off).
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"  # mse (normalised by the teacher's mean square) | cosine
    hidden_student_layers: list[int] | None = None  # None: every student layer
    hidden_teacher_layers: list[int] | None = None  # None: the student's source_layers, else evenly spaced
    # On-policy distillation (GKD): this fraction of batches are continuations sampled from the student.
    on_policy_fraction: float = 0.0
    on_policy_prompt_tokens: int = 32  # the block's first tokens are the prompt
    on_policy_new_tokens: int | None = None  # None: up to the block length
    on_policy_temperature: float = 1.0
    # Offline teacher: top-k logits cached under this folder once, reused across epochs and runs (None = off).
    teacher_cache: str | None = None
    teacher_top_k: int = 64
    # Quantization-aware distillation: train through the quantize group's schemes, fake-quantized with a
    # straight-through estimator (applied around this loop by the pipeline; see codexmini.quantize.qat).
    fake_quant: bool = False


@dataclass
class TrainerConfig:
    """How any training stage optimises: steps, batches, schedule, precision, checkpoints."""

    max_steps: int = 100
    batch_size: int = 4  # blocks per optimizer step, over all processes
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16 (auto: bf16 where the device does it fast)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | adamw_8bit (bitsandbytes)
    eval_every: int = 50
    eval_blocks: int | None = None  # None: all validation blocks
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0


def check_configs(cfg: DistillConfig, trainer: TrainerConfig) -> None:
    """Refuse bad values before any model is touched."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"distill.loss {cfg.loss!r} is not one of {LOSSES}")
    if not 0 <= cfg.kd_ratio <= 1:
        raise ValueError(f"distill.kd_ratio must be in [0, 1], got {cfg.kd_ratio}")
    if cfg.hidden_weight < 0:
        raise ValueError(f"distill.hidden_weight must be >= 0, got {cfg.hidden_weight}")
    if cfg.hidden_loss not in HIDDEN_LOSSES:
        raise ValueError(f"distill.hidden_loss {cfg.hidden_loss!r} is not one of {HIDDEN_LOSSES}")
    if not 0 <= cfg.on_policy_fraction <= 1:
        raise ValueError(f"distill.on_policy_fraction must be in [0, 1], got {cfg.on_policy_fraction}")
    if cfg.on_policy_fraction > 0 and cfg.on_policy_prompt_tokens < 1:
        raise ValueError(f"distill.on_policy_prompt_tokens must be >= 1, got {cfg.on_policy_prompt_tokens}")
    if cfg.on_policy_fraction > 0 and cfg.on_policy_temperature <= 0:
        raise ValueError(f"distill.on_policy_temperature must be > 0, got {cfg.on_policy_temperature}")
    if cfg.teacher_cache is not None and cfg.hidden_weight > 0:
        raise ValueError("distill.teacher_cache keeps only the teacher's logits, but hidden_weight > 0 needs its "
                         "hidden states every step: set distill.teacher_cache=null or distill.hidden_weight=0")
    if trainer.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"trainer.mixed_precision {trainer.mixed_precision!r} is not one of auto, no, bf16, fp16")
    if trainer.optimizer not in ("adamw", "adamw_8bit"):
        raise ValueError(f"trainer.optimizer {trainer.optimizer!r} is not one of adamw, adamw_8bit")
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "log_every"):
        if getattr(trainer, name) < 1:
            raise ValueError(f"trainer.{name} must be >= 1, got {getattr(trainer, name)}")


def resolve_precision(setting: str) -> str:
    """'auto' -> bf16 on a CUDA device with bf16 or a CPU with AVX-512 bf16 (measured faster, see README);
    otherwise fp32."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def check_vocab(student, teacher, tokenizer=None) -> None:
    """Teacher and student must share a tokenizer; a teacher vocabulary padded larger is sliced later."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vt < vs:
        raise ValueError(f"teacher vocabulary ({vt}) is smaller than the student's ({vs}): they must share the "
                         "teacher's tokenizer")
    if tokenizer is not None and len(tokenizer) > vs:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocab_size is {vs}")
    if vt > vs and tokenizer is None:
        raise ValueError(f"teacher vocabulary ({vt}) differs from the student's ({vs}); pass the shared tokenizer "
                         "so the padding can be checked")


def _optimizer(params, trainer: TrainerConfig):
    params = [p for p in params if p.requires_grad]
    if trainer.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=trainer.lr, weight_decay=trainer.weight_decay)
        except (ImportError, RuntimeError) as err:
            raise RuntimeError(f"trainer.optimizer=adamw_8bit needs a working bitsandbytes: {err}") from err
    return torch.optim.AdamW(params, lr=trainer.lr, weight_decay=trainer.weight_decay, betas=(0.9, 0.95))


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in ckpt_dir.glob("step_*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def _save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, keep: int, extra=None) -> None:
    from safetensors.torch import save_model

    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if extra is not None:
        save_model(extra, str(tmp / "extra.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
    # state.json is written last: a checkpoint without it is incomplete and ignored by resume.
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted((p for p in ckpt_dir.glob("step_*")), key=lambda p: int(p.name.split("_")[1]))[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


def _load_checkpoint(path: Path, model, optimizer, scheduler, extra=None) -> int:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    if extra is not None:
        load_model(extra, str(path / "extra.safetensors"))
    # Our own files, still loaded without unpickling arbitrary objects.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu"])
    return json.loads((path / "state.json").read_text())["step"]


def _reset_accelerate_precision(precision: str) -> None:
    """accelerate keeps one process-wide state; a second stage (or notebook cell) asking for another precision
    would be refused. In a single process it is safe to forget the old choice; under a launcher it is not."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        if AcceleratorState().mixed_precision != precision:
            AcceleratorState._reset_state()


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def batch_indices(step: int, n_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global batch of block indices for `step`: epochs are seeded permutations, so any step is reproducible."""
    per_epoch = max(n_blocks // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[offset * batch_size:(offset + 1) * batch_size] if n_blocks >= batch_size else perm


def is_on_policy(step: int, fraction: float, seed: int) -> bool:
    """Whether `step` trains on student samples: a seeded draw per step, so resume and every process agree."""
    if fraction <= 0:
        return False
    return bool(torch.rand((), generator=torch.Generator().manual_seed(seed * 7919 + step + 1)) < fraction)


def sample_on_policy(model, ids: torch.Tensor, cfg: DistillConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue each block's first `on_policy_prompt_tokens` tokens with the student's own samples.

    Returns (sequences, labels) with the prompt masked out of the labels (-100): only the student's tokens
    are scored, as in GKD. Sampling uses its own seeded RNG and leaves the training RNG untouched.
    """
    p = cfg.on_policy_prompt_tokens
    if p >= ids.shape[1]:
        raise ValueError(f"distill.on_policy_prompt_tokens ({p}) must be shorter than the block ({ids.shape[1]})")
    new = cfg.on_policy_new_tokens or ids.shape[1] - p
    was_training = model.training
    model.eval()
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        prompt = ids[:, :p]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                             min_new_tokens=new, do_sample=True, temperature=cfg.on_policy_temperature, top_k=0,
                             top_p=1.0, pad_token_id=model.config.pad_token_id or 0)
    model.train(was_training)
    labels = out.clone()
    labels[:, :p] = -100
    return out, labels


def distill(student, teacher, train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: DistillConfig,
            trainer: TrainerConfig, workdir: str | Path | None = None, tokenizer=None,
            on_step: Callable[[int], None] | None = None) -> tuple[object, dict]:
    """Train `student` to match `teacher` (or plain cross-entropy when teacher is None or kd_ratio is 0).

    Args:
        student: a CodexMiniForCausalLM (trained in place and returned).
        teacher: any causal LM sharing the tokenizer, or None. With `cfg.teacher_cache` its top-k logits are
            computed once per block and read back from disk afterwards (also by later runs).
        train_blocks / val_blocks: `[N, T]` token blocks.
        workdir: where checkpoints and metrics.jsonl go; a run finds its latest checkpoint there and resumes.
        on_step: called after every optimizer step with the step number (tests use it to interrupt).

    Returns: (student, metrics) with final validation perplexity, tokens/s and losses.
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    check_configs(cfg, trainer)
    use_teacher = teacher is not None and cfg.kd_ratio > 0
    if use_teacher:
        check_vocab(student, teacher, tokenizer)
    use_hidden = teacher is not None and cfg.hidden_weight > 0
    pairs = layer_map(student.config, teacher.config, cfg.hidden_student_layers,
                      cfg.hidden_teacher_layers) if use_hidden else []
    if cfg.on_policy_fraction > 0 and not use_teacher:
        raise ValueError("distill.on_policy_fraction > 0 needs a teacher and kd_ratio > 0")
    precision = resolve_precision(trainer.mixed_precision)
    _reset_accelerate_precision(precision)
    # TensorBoard event files through accelerate's tracker, when tensorboard is installed (extra: report).
    tracker = "tensorboard" if workdir is not None and _has_tensorboard() else None
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=trainer.grad_accum,
                              cpu=not torch.cuda.is_available(), log_with=tracker,
                              project_dir=str(workdir) if tracker else None)
    if tracker:
        accelerator.init_trackers("tensorboard")
    torch.manual_seed(trainer.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if trainer.batch_size % world:
        raise ValueError(f"trainer.batch_size ({trainer.batch_size}) must be a multiple of the process count ({world})")
    workdir = Path(workdir) if workdir is not None else None
    ckpt_dir = workdir / "checkpoints" if workdir is not None else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)

    if trainer.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    projector = HiddenProjector(len(pairs), student.config.hidden_size, teacher.config.hidden_size) \
        if use_hidden else None
    trained_extra = projector if projector is not None and not projector.identity else None
    params = list(student.parameters()) + (list(trained_extra.parameters()) if trained_extra is not None else [])
    optimizer = _optimizer(params, trainer)
    scheduler = get_cosine_schedule_with_warmup(optimizer, trainer.warmup_steps, trainer.max_steps)
    start = 0
    if ckpt_dir is not None and (latest := _latest_checkpoint(ckpt_dir)) is not None:
        start = _load_checkpoint(latest, student, optimizer, scheduler, trained_extra)
        accelerator.print(f"resuming from {latest} (step {start})")
    if trained_extra is not None:
        model, projector, optimizer, scheduler = accelerator.prepare(student, trained_extra, optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if teacher is not None and (use_teacher or use_hidden):
        teacher.to(accelerator.device).eval().requires_grad_(False)
    logit_cache = None
    if use_teacher and cfg.teacher_cache is not None:
        from .teacher_cache import TeacherLogitCache

        logit_cache = TeacherLogitCache(cfg.teacher_cache, teacher, train_blocks, cfg.teacher_top_k,
                                        student.config.vocab_size, batch_size=max(trainer.batch_size // world, 1))
    unwrapped = accelerator.unwrap_model(model)
    # The lm_head module itself when there is one (the loss then takes its fused linear path).
    student_head = unwrapped.lm_head if getattr(unwrapped, "lm_head", None) is not None else unwrapped.logits

    def evaluate():
        blocks = val_blocks if trainer.eval_blocks is None else val_blocks[: trainer.eval_blocks]
        with accelerator.autocast():
            return perplexity(unwrapped, blocks.to(accelerator.device), batch_size=trainer.batch_size)

    log = (workdir / "metrics.jsonl").open("a") if workdir is not None and accelerator.is_main_process else None
    history, tokens, checksum, n_on_policy, t0 = [], 0, 0, 0, time.perf_counter()
    micro = trainer.batch_size // trainer.grad_accum // world or 1
    bar = tqdm(range(start, trainer.max_steps), desc="distill", initial=start, total=trainer.max_steps,
               disable=not accelerator.is_main_process)
    for step in bar:
        global_idx = batch_indices(step, len(train_blocks), trainer.batch_size, trainer.seed)
        mine = global_idx[rank::world]  # each process its own slice of the global batch
        on_policy = use_teacher and is_on_policy(step, cfg.on_policy_fraction, trainer.seed)
        stats = {"loss": 0.0, "kd": 0.0, "ce": 0.0, **({"hidden": 0.0} if use_hidden else {})}
        for j, chunk in enumerate(mine.split(micro)):
            ids = labels = train_blocks[chunk].to(accelerator.device)
            kd_ratio = cfg.kd_ratio if use_teacher else 0.0
            if on_policy:
                ids, labels = sample_on_policy(unwrapped, ids, cfg, seed=trainer.seed * 1000003 + step * 131 + j
                                               + 7 * rank)
                kd_ratio = 1.0  # the student's own samples have no ground truth: divergence only (GKD)
            with accelerator.accumulate(model), accelerator.autocast():
                s_out = model(input_ids=ids, use_cache=False, skip_logits=True, output_hidden_states=use_hidden)
                t_out = None
                if use_teacher and logit_cache is not None and not on_policy:
                    t_hidden, t_head = logit_cache.get(chunk).to(accelerator.device), logit_cache.head
                elif use_teacher or use_hidden:
                    with torch.no_grad():
                        t_out = teacher.model(input_ids=ids, use_cache=False, output_hidden_states=use_hidden)
                    t_hidden, t_head = t_out.last_hidden_state, teacher.lm_head
                else:
                    t_hidden, t_head = s_out.hidden_states[-1].detach(), student_head
                losses = chunked_kd_loss(s_out.hidden_states[-1], student_head, t_hidden, t_head, labels,
                                         kind=cfg.loss, temperature=cfg.temperature,
                                         kd_ratio=kd_ratio, beta=cfg.beta, alpha=cfg.alpha,
                                         chunk_size=cfg.chunk_size)
                if use_hidden:
                    losses["hidden"] = hidden_state_loss(s_out.hidden_states, t_out.hidden_states, pairs, projector,
                                                         cfg.hidden_loss)
                    losses["loss"] = losses["loss"] + cfg.hidden_weight * losses["hidden"]
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and trainer.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), trainer.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k in stats:
                stats[k] += float(losses[k].detach()) / len(mine.split(micro))
            n_on_policy += int(on_policy) * len(chunk)
            tokens += ids.numel() * world
            checksum += int(ids.sum())
        done = step + 1
        record = {"step": done, **stats, "lr": scheduler.get_last_lr()[0]}
        if done % trainer.eval_every == 0 or done == trainer.max_steps:
            record["val_ppl"] = evaluate()["ppl"]
        history.append(record)
        if log is not None and (done % trainer.log_every == 0 or "val_ppl" in record):
            log.write(json.dumps(record) + "\n")
            if tracker:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
            log.flush()
        bar.set_postfix(loss=f"{stats['loss']:.3f}", **({"val_ppl": f"{record['val_ppl']:.2f}"}
                                                       if "val_ppl" in record else {}))
        if ckpt_dir is not None and (done % trainer.checkpoint_every == 0) and done < trainer.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(ckpt_dir, done, unwrapped, optimizer, scheduler, trainer.keep_checkpoints,
                                 accelerator.unwrap_model(projector) if trained_extra is not None else None)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(done)
    elapsed = time.perf_counter() - t0
    if log is not None:
        log.close()
    if tracker:
        accelerator.end_training()
    final = evaluate()
    if trainer.gradient_checkpointing:
        unwrapped.gradient_checkpointing_disable()
    unwrapped.eval()
    metrics = {
        "val_ppl": final["ppl"], "val_loss": final["loss"], "steps": trainer.max_steps, "resumed_from": start,
        "train_tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 and tokens else None,
        "final_train_loss": history[-1]["loss"] if history else None, "precision": precision,
        "world_size": world, "rank": rank, "data_checksum": checksum, "distill": asdict(cfg),
        "loss_curve": [r["loss"] for r in history], "on_policy_blocks": n_on_policy,
        "hidden_layer_map": pairs or None,
        "teacher_cache": {"dir": str(logit_cache.dir), "shards_computed": logit_cache.computed}
        if logit_cache is not None else None,
    }
    if accelerator.is_main_process and workdir is not None:
        accelerator.print(f"distill: val ppl {final['ppl']:.3f} after {trainer.max_steps} steps "
                          f"({metrics['tokens_per_s'] or 0:.0f} tok/s, {precision})")
    accelerator.free_memory()
    return unwrapped, {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
