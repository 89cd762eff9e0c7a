"""The shared training loop: any stage supplies a loss (and a few hooks) and gets batching, precision, gradient
accumulation, checkpoints with exact resume, evaluation and metric tracking, on accelerate.

The same code runs single-process on CPU or GPU and multi-process under `accelerate launch` / `torchrun` (each
process takes its own slice of every global batch). Which blocks a step trains on depends only on the step and
the seed, and checkpoints hold model, optimizer, scheduler, RNG and the stage's own state, so a run interrupted at
any point resumes to the same weights as one never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.perplexity import perplexity
from .batching import batch_indices, micro_batches, process_slice
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainerConfig, check_trainer_config
from .optim import build_optimizer, build_scheduler
from .precision import reset_accelerate_precision, resolve_precision
from .tracking import MetricsLog, resolve_tracker


@dataclass
class Batch:
    """One micro-batch as the loss sees it."""

    ids: torch.Tensor  # [b, T] token ids, on the device
    labels: torch.Tensor  # [b, T]; position t predicts labels[:, t+1]; -100 is not scored
    index: torch.Tensor  # [b] rows of train_blocks it came from (CPU)
    step: int  # the optimizer step it belongs to, from 0
    micro: int  # its number among the step's micro-batches on this process


@dataclass
class TrainContext:
    """What the loop hands the loss and the hooks."""

    accelerator: Any
    model: nn.Module  # prepared (DDP-wrapped under a launcher): call this one for the forward
    unwrapped: nn.Module  # the model itself (its heads, its config, generation)
    modules: dict[str, nn.Module]  # the extra trained modules, prepared
    trainer: TrainerConfig
    precision: str
    workdir: Path | None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


LossFn = Callable[[TrainContext, Batch], dict[str, torch.Tensor]]


@dataclass
class Hooks:
    """What a stage adds to the loop; every hook is optional.

    modules: extra modules trained with the model ({name: module}: optimised, prepared, checkpointed as
        `<name>.safetensors`). Parameters train when they require a gradient.
    setup(ctx): once, after resume and `prepare`, before the first step (move a teacher to `ctx.device`).
    batch(ctx, batch) -> batch: rewrite a micro-batch before the loss, outside autocast (on-policy samples).
    evaluate(ctx, blocks) -> {name: float}: validation, logged as `val_<name>`; default perplexity
        ({"ppl", "loss"}) of `ctx.unwrapped` on `blocks`.
    state() -> dict / load_state(dict): JSON-able stage state kept in checkpoints (counters).
    on_step(step): after every optimizer step and its checkpoint (tests use it to interrupt a run).
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    setup: Callable[[TrainContext], None] | None = None
    batch: Callable[[TrainContext, Batch], Batch] | None = None
    evaluate: Callable[[TrainContext, torch.Tensor], dict[str, float]] | None = None
    state: Callable[[], dict] | None = None
    load_state: Callable[[dict], None] | None = None
    on_step: Callable[[int], None] | None = None


def evaluate_perplexity(ctx: TrainContext, blocks: torch.Tensor) -> dict[str, float]:
    """The default evaluation: next-token perplexity and loss of the model on `blocks [N, T]`."""
    with ctx.accelerator.autocast():
        result = perplexity(ctx.unwrapped, blocks.to(ctx.device), batch_size=ctx.trainer.batch_size)
    return {"ppl": result["ppl"], "loss": result["loss"]}


def fit(model: nn.Module, loss_fn: LossFn, train_blocks: torch.Tensor, val_blocks: torch.Tensor | None,
        trainer: TrainerConfig, workdir: str | Path | None = None, hooks: Hooks | None = None,
        name: str = "train") -> tuple[nn.Module, dict]:
    """Train `model` in place for `trainer.max_steps` optimizer steps of `loss_fn`.

    Args:
        model: any torch module (an HF causal LM for the default evaluation and gradient checkpointing).
        loss_fn(ctx, batch) -> {"loss": scalar with a gradient, other scalars logged beside it}.
        train_blocks / val_blocks: `[N, T]` token blocks (val_blocks None: no evaluation).
        workdir: where checkpoints/, metrics.jsonl and tracker files go; a run finds its latest intact checkpoint
            there and resumes from it. None: nothing is written.
        hooks: what the stage adds (extra trained modules, setup, batch rewriting, evaluation, checkpointed
            state, a per-step callback); see `Hooks`.
        name: the progress bar's label.

    Returns: (model, metrics) with the final `val_*` numbers, steps, tokens/s, the loss curve and the step
        resumed from.
    """
    from accelerate import Accelerator

    check_trainer_config(trainer)
    hooks = hooks or Hooks()
    workdir = Path(workdir) if workdir is not None else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(trainer.mixed_precision)
    reset_accelerate_precision(precision)
    tracker = resolve_tracker(trainer.log_with, workdir)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=trainer.grad_accum,
                              cpu=not torch.cuda.is_available(), log_with=tracker,
                              project_dir=str(workdir) if tracker else None)
    torch.manual_seed(trainer.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if trainer.batch_size % world:
        raise ValueError(f"trainer.batch_size ({trainer.batch_size}) must be a multiple of the process count ({world})")
    ckpt_dir = workdir / "checkpoints" if workdir is not None else None

    if trainer.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"trainer.gradient_checkpointing needs a transformers model; got {type(model).__name__}")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for module in hooks.modules.values():
        module.train()
    params = [p for m in (model, *hooks.modules.values()) for p in m.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, trainer)
    scheduler = build_scheduler(optimizer, trainer)
    start = 0
    if ckpt_dir is not None and (latest := latest_checkpoint(ckpt_dir)) is not None:
        start, state = load_checkpoint(latest, model, optimizer, scheduler, hooks.modules)
        if hooks.load_state is not None:
            hooks.load_state(state)
        accelerator.print(f"resuming from {latest} (step {start})")
    names = list(hooks.modules)
    prepared_model, *prepared, optimizer, scheduler = accelerator.prepare(
        model, *hooks.modules.values(), optimizer, scheduler)
    ctx = TrainContext(accelerator, prepared_model, accelerator.unwrap_model(prepared_model),
                       dict(zip(names, prepared)), trainer, precision, workdir)
    if hooks.setup is not None:
        hooks.setup(ctx)
    evaluate = hooks.evaluate or evaluate_perplexity
    eval_blocks = None
    if val_blocks is not None and len(val_blocks):
        eval_blocks = val_blocks if trainer.eval_blocks is None else val_blocks[: trainer.eval_blocks]

    log = MetricsLog(accelerator, workdir, tracker, config=asdict(trainer))
    history, tokens, checksum, last_eval, t0 = [], 0, 0, None, time.perf_counter()
    bar = tqdm(range(start, trainer.max_steps), desc=name, initial=start, total=trainer.max_steps,
               disable=not accelerator.is_main_process)
    try:
        for step in bar:
            mine = process_slice(batch_indices(step, len(train_blocks), trainer.batch_size, trainer.seed), rank, world)
            chunks = micro_batches(mine, trainer.batch_size, trainer.grad_accum, world)
            stats: dict[str, float] = {}
            for j, chunk in enumerate(chunks):
                ids = train_blocks[chunk].to(accelerator.device)
                batch = Batch(ids=ids, labels=ids, index=chunk, step=step, micro=j)
                if hooks.batch is not None:
                    batch = hooks.batch(ctx, batch)
                with accelerator.accumulate(prepared_model, *prepared), accelerator.autocast():
                    losses = loss_fn(ctx, batch)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and trainer.max_grad_norm:
                        accelerator.clip_grad_norm_(params, trainer.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    stats[k] = stats.get(k, 0.0) + float(v.detach()) / len(chunks)
                tokens += batch.ids.numel() * world
                checksum += int(batch.ids.sum())
            done = step + 1
            record = {"step": done, **stats, "lr": scheduler.get_last_lr()[0]}
            evaluated = eval_blocks is not None and (done % trainer.eval_every == 0 or done == trainer.max_steps)
            if evaluated:
                last_eval = evaluate(ctx, eval_blocks)
                record.update({f"val_{k}": v for k, v in last_eval.items()})
            history.append(record)
            if done % trainer.log_every == 0 or evaluated or done == trainer.max_steps:
                log.log(record)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if ckpt_dir is not None and done % trainer.checkpoint_every == 0 and done < trainer.max_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(ckpt_dir, done, ctx.unwrapped, optimizer, scheduler, trainer.keep_checkpoints,
                                    {n: accelerator.unwrap_model(m) for n, m in ctx.modules.items()},
                                    hooks.state() if hooks.state is not None else None)
                accelerator.wait_for_everyone()
            if hooks.on_step is not None:
                hooks.on_step(done)
    finally:
        # Also when a step raises (or a test interrupts the run): the jsonl is complete up to there.
        log.close()
    elapsed = time.perf_counter() - t0
    # The last step was just evaluated; only a run with no step left to do evaluates here.
    final = last_eval if history and history[-1]["step"] == trainer.max_steps else None
    if final is None and eval_blocks is not None:
        final = evaluate(ctx, eval_blocks)
    if trainer.gradient_checkpointing:
        ctx.unwrapped.gradient_checkpointing_disable()
    ctx.unwrapped.eval()
    metrics = {
        **{f"val_{k}": v for k, v in (final or {}).items()}, "steps": trainer.max_steps, "resumed_from": start,
        "train_tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 and tokens else None,
        "final_train_loss": history[-1]["loss"] if history else None, "precision": precision,
        "world_size": world, "rank": rank, "data_checksum": checksum, "loss_curve": [r["loss"] for r in history],
    }
    if accelerator.is_main_process and workdir is not None:
        shown = ", ".join(f"val {k} {v:.4g}" for k, v in (final or {}).items())
        accelerator.print(f"{name}: {shown + ' ' if shown else ''}after {trainer.max_steps} steps "
                          f"({metrics['tokens_per_s'] or 0:.0f} tok/s, {precision})")
    accelerator.free_memory()
    return ctx.unwrapped, {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
