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


def _optimizer(model, trainer: TrainerConfig):
    params = [p for p in model.parameters() if p.requires_grad]
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


def _save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, keep: int) -> None:
    from safetensors.torch import save_model

    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
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


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
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


def batch_indices(step: int, n_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global batch of block indices for `step`: epochs are seeded permutations, so any step is reproducible."""
    per_epoch = max(n_blocks // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[offset * batch_size:(offset + 1) * batch_size] if n_blocks >= batch_size else perm


def distill(student, teacher, train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: DistillConfig,
            trainer: TrainerConfig, workdir: str | Path | None = None, tokenizer=None,
            on_step: Callable[[int], None] | None = None) -> tuple[object, dict]:
    """Train `student` to match `teacher` (or plain cross-entropy when teacher is None or kd_ratio is 0).

    Args:
        student: a CodexMiniForCausalLM (trained in place and returned).
        teacher: any causal LM sharing the tokenizer, or None.
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
    precision = resolve_precision(trainer.mixed_precision)
    _reset_accelerate_precision(precision)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=trainer.grad_accum,
                              cpu=not torch.cuda.is_available())
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
    optimizer = _optimizer(student, trainer)
    scheduler = get_cosine_schedule_with_warmup(optimizer, trainer.warmup_steps, trainer.max_steps)
    start = 0
    if ckpt_dir is not None and (latest := _latest_checkpoint(ckpt_dir)) is not None:
        start = _load_checkpoint(latest, student, optimizer, scheduler)
        accelerator.print(f"resuming from {latest} (step {start})")
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if use_teacher:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    unwrapped = accelerator.unwrap_model(model)
    # The lm_head module itself when there is one (the loss then takes its fused linear path).
    student_head = unwrapped.lm_head if getattr(unwrapped, "lm_head", None) is not None else unwrapped.logits

    def evaluate():
        blocks = val_blocks if trainer.eval_blocks is None else val_blocks[: trainer.eval_blocks]
        with accelerator.autocast():
            return perplexity(unwrapped, blocks.to(accelerator.device), batch_size=trainer.batch_size)

    log = (workdir / "metrics.jsonl").open("a") if workdir is not None and accelerator.is_main_process else None
    history, tokens, checksum, t0 = [], 0, 0, time.perf_counter()
    micro = trainer.batch_size // trainer.grad_accum // world or 1
    bar = tqdm(range(start, trainer.max_steps), desc="distill", initial=start, total=trainer.max_steps,
               disable=not accelerator.is_main_process)
    for step in bar:
        global_idx = batch_indices(step, len(train_blocks), trainer.batch_size, trainer.seed)
        mine = global_idx[rank::world]  # each process its own slice of the global batch
        stats = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        for chunk in mine.split(micro):
            ids = train_blocks[chunk].to(accelerator.device)
            with accelerator.accumulate(model), accelerator.autocast():
                s_out = model(input_ids=ids, use_cache=False, skip_logits=True)
                if use_teacher:
                    with torch.no_grad():
                        t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
                    t_head = teacher.lm_head
                else:
                    t_hidden, t_head = s_out.hidden_states[-1].detach(), student_head
                losses = chunked_kd_loss(s_out.hidden_states[-1], student_head, t_hidden, t_head, ids,
                                         kind=cfg.loss, temperature=cfg.temperature,
                                         kd_ratio=cfg.kd_ratio if use_teacher else 0.0, beta=cfg.beta,
                                         alpha=cfg.alpha, chunk_size=cfg.chunk_size)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and trainer.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), trainer.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k in stats:
                stats[k] += float(losses[k].detach()) / len(mine.split(micro))
            tokens += ids.numel() * world
            checksum += int(ids.sum())
        done = step + 1
        record = {"step": done, **stats, "lr": scheduler.get_last_lr()[0]}
        if done % trainer.eval_every == 0 or done == trainer.max_steps:
            record["val_ppl"] = evaluate()["ppl"]
        history.append(record)
        if log is not None and (done % trainer.log_every == 0 or "val_ppl" in record):
            log.write(json.dumps(record) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{stats['loss']:.3f}", **({"val_ppl": f"{record['val_ppl']:.2f}"}
                                                       if "val_ppl" in record else {}))
        if ckpt_dir is not None and (done % trainer.checkpoint_every == 0) and done < trainer.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(ckpt_dir, done, unwrapped, optimizer, scheduler, trainer.keep_checkpoints)
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(done)
    elapsed = time.perf_counter() - t0
    if log is not None:
        log.close()
    final = evaluate()
    if trainer.gradient_checkpointing:
        unwrapped.gradient_checkpointing_disable()
    unwrapped.eval()
    metrics = {
        "val_ppl": final["ppl"], "val_loss": final["loss"], "steps": trainer.max_steps, "resumed_from": start,
        "train_tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 and tokens else None,
        "final_train_loss": history[-1]["loss"] if history else None, "precision": precision,
        "world_size": world, "rank": rank, "data_checksum": checksum, "distill": asdict(cfg), "loss_curve": [r["loss"] for r in history],
    }
    if accelerator.is_main_process and workdir is not None:
        accelerator.print(f"distill: val ppl {final['ppl']:.3f} after {trainer.max_steps} steps "
                          f"({metrics['tokens_per_s'] or 0:.0f} tok/s, {precision})")
    accelerator.free_memory()
    return unwrapped, {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
