"""Attention transfer (LoLCATs, stage 1): teach linearized layers to reproduce softmax attention.

Each linear / hybrid layer of the student was a softmax layer of the teacher and kept its q/k/v/o weights. A
frozen softmax copy of that layer (same projections, `Attention` class) gives the target; the linear layer is
trained so that its output matches the target's on the same inputs (the hidden states reaching that layer in the
student's own forward). Only the feature maps (and decays) train at first (`train="feature_maps"`), as in
LoLCATs; `train="attention"` also trains the layer's q/k/v/o.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.attention import Attention, LinearAttention
from ..models.modeling import rotary_cos_sin


@dataclass
class TransferConfig:
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


def attention_transfer(student, train_blocks: torch.Tensor, val_blocks: torch.Tensor,
                       cfg: TransferConfig) -> tuple[object, dict]:
    """Train the linearized layers of `student` (in place) to match softmax attention; returns (student, metrics)."""
    if cfg.train not in ("feature_maps", "attention"):
        raise ValueError(f"transfer.train {cfg.train!r} is not one of feature_maps, attention")
    layers = _linearized_layers(student)
    if not layers:
        return student, {"transfer_layers": [], "note": "no linear or hybrid layers to train"}
    before = transfer_error(student, val_blocks)
    twins = {i: _softmax_twin(a) for i, a in layers}
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
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.steps), desc="attention transfer"):
        ids = train_blocks[torch.randint(len(train_blocks), (cfg.batch_size,), generator=g)]
        xs = _layer_inputs(student, ids, [i for i, _ in layers])
        cos, sin = _rope(student, ids, xs[layers[0][0]].dtype)
        # Each layer learns from its own inputs, so the losses are independent and simply add up.
        loss = sum(F.mse_loss(attn(xs[i], cos, sin), twins[i](xs[i], cos, sin)) for i, attn in layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for n, p in student.named_parameters():
        p.requires_grad_(was[n])
    after = transfer_error(student, val_blocks)
    return student, {"transfer_layers": [i for i, _ in layers], "transfer_mse_before": before,
                     "transfer_mse_after": after}
