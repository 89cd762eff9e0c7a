"""Attention transfer (LoLCATs, stage 1): teach linearized layers to reproduce softmax attention.

Each linear / hybrid layer of the student was a softmax layer of the teacher and kept its q/k/v/o weights. A
frozen softmax copy of that layer (same projections, `Attention` class) gives the target; the linear layer is
trained so that its output matches the target's on the same inputs (the hidden states reaching that layer in the
student's own forward). Only the feature maps (and decays) train at first (`train="feature_maps"`), as in
LoLCATs; `train="attention"` also trains the layer's q/k/v/o.

Training runs on the shared trainer (`codexmini.train.fit`): the objective is a module (the student and the frozen
twins) whose forward returns the per-layer errors, so it runs under DDP like any model, checkpoints and resumes,
and logs to metrics.jsonl and the tracker when given a workdir.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import Attention, LinearAttention
from ..models.modeling import rotary_cos_sin
from ..train import Batch, Hooks, TrainContext, TrainerConfig, fit


@dataclass
class TransferConfig:
    """What attention transfer trains, for how long. These four are its own; everything else about the
    optimisation (precision, checkpoints, tracker, ...) comes from a TrainerConfig (see `attention_transfer`)."""

    steps: int = 50
    batch_size: int = 4
    lr: float = 1e-2
    train: str = "feature_maps"  # feature_maps | attention
    seed: int = 0


def _linearized_layers(student):
    return [(i, layer.self_attn) for i, layer in enumerate(student.model.layers)
            if isinstance(layer.self_attn, LinearAttention)]


def _softmax_twin(attn: LinearAttention) -> Attention:
    """A frozen softmax layer with the same projections: the target the linear layer learns to imitate."""
    twin = Attention(attn.config, attn.layer_idx)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(twin, name, copy.deepcopy(getattr(attn, name)))
    return twin.eval().requires_grad_(False)


@torch.no_grad()
def _layer_inputs(student, ids, layer_ids):
    """Input of each chosen layer's attention (after its input norm) in the student's forward."""
    captured, hooks = {}, []
    for i in layer_ids:
        layer = student.model.layers[i]
        hooks.append(layer.input_layernorm.register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(i, out.detach())))
    try:
        student.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _rope(student, ids, dtype):
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    return rotary_cos_sin(pos, student.config.head_dim, student.config.rope_theta, dtype)


def transfer_error(student, blocks: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Mean squared error between each linearized layer's output and its softmax twin's, per layer."""
    layers = _linearized_layers(student)
    twins = {i: _softmax_twin(a) for i, a in layers}
    totals = {i: 0.0 for i, _ in layers}
    n = 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size]
            xs = _layer_inputs(student, ids, [i for i, _ in layers])
            cos, sin = _rope(student, ids, xs[layers[0][0]].dtype)
            for i, attn in layers:
                totals[i] += F.mse_loss(attn(xs[i], cos, sin), twins[i](xs[i], cos, sin)).item() * len(ids)
            n += len(ids)
    return {i: v / max(n, 1) for i, v in totals.items()}


class _TransferObjective(nn.Module):
    """The student with a frozen softmax twin per linearized layer; forward(ids `[B, T]`) -> MSE per layer `[L]`."""

    def __init__(self, student, layers):
        super().__init__()
        self.student = student
        self.layer_ids = [i for i, _ in layers]
        # Made once, from the weights before training: with train="attention" the linear layer's own q/k/v/o
        # move, the target stays the teacher's softmax attention.
        self.twins = nn.ModuleDict({str(i): _softmax_twin(a) for i, a in layers})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        xs = _layer_inputs(self.student, ids, self.layer_ids)
        cos, sin = _rope(self.student, ids, xs[self.layer_ids[0]].dtype)
        # Each layer learns from its own inputs, so the losses are independent and simply add up.
        return torch.stack([F.mse_loss(self.student.model.layers[i].self_attn(xs[i], cos, sin),
                                       self.twins[str(i)](xs[i], cos, sin)) for i in self.layer_ids])


def transfer_trainer(cfg: TransferConfig, trainer: TrainerConfig | None = None) -> TrainerConfig:
    """The TrainerConfig a transfer runs with: `trainer` (default: fp32, no warmup, no weight decay or clipping,
    evaluated and checkpointed at the end only) with steps, batch size, lr and seed taken from `cfg`."""
    if trainer is None:
        trainer = TrainerConfig(warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, mixed_precision="no",
                                eval_every=max(cfg.steps, 1), checkpoint_every=max(cfg.steps, 1))
    return replace(trainer, max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)


def attention_transfer(student, train_blocks: torch.Tensor, val_blocks: torch.Tensor, cfg: TransferConfig,
                       workdir: str | Path | None = None, trainer: TrainerConfig | None = None
                       ) -> tuple[object, dict]:
    """Train the linearized layers of `student` (in place) to match softmax attention; returns (student, metrics).

    Args:
        train_blocks / val_blocks: `[N, T]` token blocks; the error is measured on val_blocks before and after.
        workdir: where checkpoints, metrics.jsonl and tracker files go (None: nothing is written).
        trainer: how to optimise (see `transfer_trainer`); cfg's steps, batch_size, lr and seed always win.

    Returns: metrics with the trained layers, the per-layer error before and after, and the trainer's numbers
        (steps, tokens/s, loss curve, the step resumed from).
    """
    if cfg.train not in ("feature_maps", "attention"):
        raise ValueError(f"transfer.train {cfg.train!r} is not one of feature_maps, attention")
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"transfer.steps must be >= 0 and transfer.batch_size >= 1, got {cfg.steps}, "
                         f"{cfg.batch_size}")
    if cfg.lr <= 0:
        raise ValueError(f"transfer.lr must be > 0, got {cfg.lr}")
    layers = _linearized_layers(student)
    if not layers:
        return student, {"transfer_layers": [], "note": "no linear or hybrid layers to train"}
    before = transfer_error(student, val_blocks)
    if cfg.steps == 0:
        return student, {"transfer_layers": [i for i, _ in layers], "transfer_mse_before": before,
                         "transfer_mse_after": before, "note": "transfer.steps=0: nothing trained"}
    params = []
    for _, attn in layers:
        for name, p in attn.named_parameters():
            if cfg.train == "attention" or name.startswith(("feature_map_", "decay_logit")):
                params.append(p)
    if not params:
        raise ValueError("transfer.train=feature_maps, but the linearized layers have no learnable feature map "
                         "(use feature_map=hedgehog, linear_decay=true, or transfer.train=attention)")
    trainable = {id(p) for p in params}
    was = {n: p.requires_grad for n, p in student.named_parameters()}
    was_training = student.training
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    objective = _TransferObjective(student, layers)
    last = {}

    def loss(ctx: TrainContext, batch: Batch) -> dict[str, torch.Tensor]:
        per_layer = ctx.model(batch.ids)
        return {"loss": per_layer.sum(), **{f"mse_layer{i}": e for i, e in zip(objective.layer_ids, per_layer)}}

    def evaluate(ctx: TrainContext, blocks: torch.Tensor) -> dict[str, float]:
        # fp32, outside autocast, as `before` was measured.
        last.update(transfer_error(student, blocks.to(ctx.device)))
        return {"mse": sum(last.values()) / len(last)}

    run_cfg = transfer_trainer(cfg, trainer)
    try:
        _, metrics = fit(objective, loss, train_blocks, val_blocks, run_cfg, workdir=workdir,
                         hooks=Hooks(evaluate=evaluate), name="attention transfer")
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(was[n])
        student.train(was_training)
    # The final evaluation already measured every validation block, unless trainer.eval_blocks cut them.
    after = dict(last) if last and run_cfg.eval_blocks is None else \
        transfer_error(student, val_blocks.to(next(student.parameters()).device))
    return student, {**metrics, "transfer_layers": [i for i, _ in layers], "transfer_mse_before": before,
                     "transfer_mse_after": after}
