"""Knowledge distillation: a student learns to match a teacher on token blocks.

This module is the distillation loss and the few hooks it needs on the shared trainer (`codexmini.train.fit`,
which owns batching, precision, gradient accumulation, checkpoints and exact resume, metric tracking, and runs
the same on one CPU or under `accelerate launch` / `torchrun`): a teacher moved to the device and optionally
cached, a hidden-state projector trained beside the student, on-policy (GKD) batches sampled from the student and
sequence-level batches sampled from the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..train import Batch, Hooks, TrainContext, TrainerConfig, check_trainer_config, fit
from ..train.config import check_int, check_number
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
    # The prompt and length of every sampled batch, the student's (on-policy) or the teacher's (sequence-level).
    on_policy_prompt_tokens: int = 32  # the block's first tokens are the prompt
    on_policy_new_tokens: int | None = None  # None: up to the block length
    on_policy_temperature: float = 1.0
    # Sequence-level distillation (Kim & Rush): this fraction of batches are the teacher's own continuations,
    # learned with the usual loss (cross-entropy on the teacher's tokens, plus the KD term on them).
    sequence_level_fraction: float = 0.0
    sequence_level_temperature: float = 0.0  # 0: the teacher's greedy continuation; > 0: sampled at it
    # Offline teacher: its distributions cached under this folder once, reused across epochs and runs (None = off).
    teacher_cache: str | None = None
    teacher_cache_mode: str = "topk"  # topk (k largest logits) | sample (k unbiased draws; forward_kl at T=1)
    teacher_top_k: int = 64  # k: logits kept (topk) or draws (sample) per position
    # Quantization-aware distillation: train through the quantize group's schemes, fake-quantized with a
    # straight-through estimator (applied around this loop by the distill stage; see codexmini.models.qat).
    fake_quant: bool = False


def check_configs(cfg: DistillConfig, trainer: TrainerConfig) -> None:
    """Refuse bad values before any model is touched; every message names its `distill.` key."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"distill.loss {cfg.loss!r} is not one of {LOSSES}")
    # A temperature of 0 divides the logits by zero: the run would train to NaN.
    check_number("distill.temperature", cfg.temperature, positive=True)
    for name in ("kd_ratio", "beta", "alpha", "on_policy_fraction", "sequence_level_fraction"):
        check_number(f"distill.{name}", getattr(cfg, name), low=0, high=1)
    if cfg.on_policy_fraction + cfg.sequence_level_fraction > 1:
        raise ValueError(f"distill.on_policy_fraction ({cfg.on_policy_fraction}) + distill.sequence_level_fraction "
                         f"({cfg.sequence_level_fraction}) is more than 1: they are shares of the same batches")
    check_int("distill.chunk_size", cfg.chunk_size, low=1)
    check_number("distill.hidden_weight", cfg.hidden_weight, low=0)
    if cfg.hidden_loss not in HIDDEN_LOSSES:
        raise ValueError(f"distill.hidden_loss {cfg.hidden_loss!r} is not one of {HIDDEN_LOSSES}")
    for name in ("hidden_student_layers", "hidden_teacher_layers"):
        layers = getattr(cfg, name)
        if layers is not None:
            for i, layer in enumerate(layers):
                check_int(f"distill.{name}[{i}]", layer, low=0)
            if len(set(layers)) != len(layers) and name == "hidden_student_layers":
                raise ValueError(f"distill.{name} {list(layers)} lists a layer twice")
    check_int("distill.on_policy_prompt_tokens", cfg.on_policy_prompt_tokens, low=1)
    if cfg.on_policy_new_tokens is not None:
        check_int("distill.on_policy_new_tokens", cfg.on_policy_new_tokens, low=1, none="or null")
    check_number("distill.on_policy_temperature", cfg.on_policy_temperature, positive=True)
    check_number("distill.sequence_level_temperature", cfg.sequence_level_temperature, low=0)
    check_int("distill.teacher_top_k", cfg.teacher_top_k, low=1)
    if cfg.teacher_cache is not None and not str(cfg.teacher_cache).strip():
        raise ValueError("distill.teacher_cache must be a folder path or null, got an empty string")
    from .teacher_cache import CACHE_MODES, check_cache_settings

    if cfg.teacher_cache_mode not in CACHE_MODES:  # refused even while the cache is off: it is a typo either way
        raise ValueError(f"distill.teacher_cache_mode {cfg.teacher_cache_mode!r} is not one of "
                         f"{', '.join(CACHE_MODES)}")
    if cfg.teacher_cache is not None:
        check_cache_settings(cfg.teacher_cache_mode, cfg.teacher_top_k, cfg.loss, cfg.temperature)
    if cfg.teacher_cache is not None and cfg.hidden_weight > 0:
        raise ValueError("distill.teacher_cache keeps only the teacher's logits, but hidden_weight > 0 needs its "
                         "hidden states every step: set distill.teacher_cache=null or distill.hidden_weight=0")
    check_trainer_config(trainer)


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


def step_draw(step: int, seed: int) -> float:
    """One seeded uniform draw per step, so resume and every process agree on what a step trains on."""
    return float(torch.rand((), generator=torch.Generator().manual_seed(seed * 7919 + step + 1)))


def is_on_policy(step: int, fraction: float, seed: int) -> bool:
    """Whether `step` trains on student samples (the first `fraction` of the step's draw)."""
    return fraction > 0 and step_draw(step, seed) < fraction


def batch_source(step: int, cfg: DistillConfig, seed: int) -> str:
    """What `step` trains on: "student" samples (on-policy), "teacher" samples (sequence-level) or the "data"."""
    if cfg.on_policy_fraction <= 0 and cfg.sequence_level_fraction <= 0:
        return "data"
    u = step_draw(step, seed)
    if u < cfg.on_policy_fraction:
        return "student"
    return "teacher" if u < cfg.on_policy_fraction + cfg.sequence_level_fraction else "data"


def sample_on_policy(model, ids: torch.Tensor, cfg: DistillConfig, seed: int, temperature: float | None = None,
                     vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue each block's first `on_policy_prompt_tokens` tokens with `model`'s own samples.

    `model` is the student (on-policy, at `on_policy_temperature`) or the teacher (sequence-level, at
    `temperature`; 0 is greedy). `vocab_size` keeps a teacher whose vocabulary is padded past the student's from
    emitting the padding ids. Returns (sequences, labels) with the prompt masked out of the labels (-100): only
    the sampled tokens are scored. Sampling uses its own seeded RNG and leaves the training RNG untouched.
    """
    p = cfg.on_policy_prompt_tokens
    if p >= ids.shape[1]:
        raise ValueError(f"distill.on_policy_prompt_tokens ({p}) must be shorter than the block ({ids.shape[1]})")
    new = cfg.on_policy_new_tokens or ids.shape[1] - p
    temperature = cfg.on_policy_temperature if temperature is None else temperature
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    padded = model.config.vocab_size
    if vocab_size is not None and padded > vocab_size:
        sampling["suppress_tokens"] = list(range(vocab_size, padded))
    was_training = model.training
    model.eval()
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        prompt = ids[:, :p]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=model.config.pad_token_id or 0, **sampling)
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
        workdir: where checkpoints, metrics.jsonl and tracker files go; a run finds its latest checkpoint there
            and resumes.
        on_step: called after every optimizer step with the step number (tests use it to interrupt).

    Returns: (student, metrics) with final validation perplexity, tokens/s and losses.
    """
    check_configs(cfg, trainer)
    use_teacher = teacher is not None and cfg.kd_ratio > 0
    if use_teacher:
        check_vocab(student, teacher, tokenizer)
    use_hidden = teacher is not None and cfg.hidden_weight > 0
    pairs = layer_map(student.config, teacher.config, cfg.hidden_student_layers,
                      cfg.hidden_teacher_layers) if use_hidden else []
    if cfg.on_policy_fraction > 0 and not use_teacher:
        raise ValueError("distill.on_policy_fraction > 0 needs a teacher and kd_ratio > 0")
    if cfg.sequence_level_fraction > 0 and teacher is None:
        raise ValueError("distill.sequence_level_fraction > 0 needs a teacher: its continuations are the data")
    projector = HiddenProjector(len(pairs), student.config.hidden_size, teacher.config.hidden_size) \
        if use_hidden else None
    # Only a projector with weights (widths differ) trains and goes into checkpoints.
    modules = {"projector": projector} if projector is not None and not projector.identity else {}
    # Counted over the whole run, kept in checkpoints.
    counts = {"on_policy_blocks": 0, "sequence_level_blocks": 0}
    # Filled in once the device is known.
    shared = {"cache": None, "head": None}
    sampled = cfg.on_policy_fraction > 0 or cfg.sequence_level_fraction > 0

    def source(step: int) -> str:
        return batch_source(step, cfg, trainer.seed) if teacher is not None else "data"

    def setup(ctx: TrainContext) -> None:
        if teacher is not None and (use_teacher or use_hidden or cfg.sequence_level_fraction > 0):
            teacher.to(ctx.device).eval().requires_grad_(False)
        if use_teacher and cfg.teacher_cache is not None:
            from .teacher_cache import TeacherLogitCache

            shared["cache"] = TeacherLogitCache(cfg.teacher_cache, teacher, train_blocks, cfg.teacher_top_k,
                                                student.config.vocab_size,
                                                batch_size=max(trainer.batch_size // ctx.world, 1),
                                                mode=cfg.teacher_cache_mode, seed=trainer.seed)
        # The lm_head module itself when there is one (the loss then takes its fused linear path).
        model = ctx.unwrapped
        shared["head"] = model.lm_head if getattr(model, "lm_head", None) is not None else model.logits

    def sample_batch(ctx: TrainContext, batch: Batch) -> Batch:
        kind = source(batch.step)
        if kind == "data":
            return batch
        seed = trainer.seed * 1000003 + batch.step * 131 + batch.micro + 7 * ctx.rank
        if kind == "student":
            ids, labels = sample_on_policy(ctx.unwrapped, batch.ids, cfg, seed=seed)
        else:
            ids, labels = sample_on_policy(teacher, batch.ids, cfg, seed=seed,
                                           temperature=cfg.sequence_level_temperature,
                                           vocab_size=student.config.vocab_size)
        counts["on_policy_blocks" if kind == "student" else "sequence_level_blocks"] += len(batch.index)
        return replace(batch, ids=ids, labels=labels)

    def loss(ctx: TrainContext, batch: Batch) -> dict[str, torch.Tensor]:
        kind = source(batch.step)
        # The student's own samples have no ground truth: divergence only (GKD). The teacher's are ground truth.
        kd_ratio = 1.0 if kind == "student" else cfg.kd_ratio if use_teacher else 0.0
        s_out = ctx.model(input_ids=batch.ids, use_cache=False, skip_logits=True, output_hidden_states=use_hidden)
        t_out, cache, head = None, shared["cache"], shared["head"]
        if use_teacher and cache is not None and kind == "data":
            t_hidden, t_head = cache.get(batch.index).to(ctx.device), cache.head
        elif use_teacher or use_hidden:
            with torch.no_grad():
                t_out = teacher.model(input_ids=batch.ids, use_cache=False, output_hidden_states=use_hidden)
            t_hidden, t_head = t_out.last_hidden_state, teacher.lm_head
        else:
            t_hidden, t_head = s_out.hidden_states[-1].detach(), head
        losses = chunked_kd_loss(s_out.hidden_states[-1], head, t_hidden, t_head, batch.labels, kind=cfg.loss,
                                 temperature=cfg.temperature, kd_ratio=kd_ratio, beta=cfg.beta, alpha=cfg.alpha,
                                 chunk_size=cfg.chunk_size)
        if use_hidden:
            losses["hidden"] = hidden_state_loss(s_out.hidden_states, t_out.hidden_states, pairs,
                                                 ctx.modules.get("projector", projector), cfg.hidden_loss)
            losses["loss"] = losses["loss"] + cfg.hidden_weight * losses["hidden"]
        return losses

    hooks = Hooks(modules=modules, setup=setup, batch=sample_batch if sampled else None,
                  state=lambda: dict(counts), load_state=counts.update, on_step=on_step)
    student, metrics = fit(student, loss, train_blocks, val_blocks, trainer, workdir=workdir, hooks=hooks,
                           name="distill")
    cache = shared["cache"]
    return student, {
        **metrics, "distill": asdict(cfg), "on_policy_blocks": counts["on_policy_blocks"],
        "sequence_level_blocks": counts["sequence_level_blocks"],
        "hidden_layer_map": pairs or None,
        "teacher_cache": {"dir": str(cache.dir), "shards_computed": cache.computed} if cache is not None else None,
    }
