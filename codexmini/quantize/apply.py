"""Quantize a CodexMini model: pick a scheme per linear layer, compute codes (RTN, GPTQ or activation-aware),
swap in `QuantLinear` modules and record the schemes in the config so `from_pretrained` rebuilds them.

Calibrated methods run the decoder layer by layer: the calibration blocks' hidden states enter layer i as the
already-quantized layers 0..i-1 produce them, so each layer corrects for the error upstream of it (as GPTQ does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.quantized import QuantEmbedding, QuantLinear
from ..ops.layouts import Scheme, quantize_int8, quantize_rtn
from .awq import awq_search_and_fold
from .gptq import HessianAccumulator, gptq_quantize
from ..models.qat import plan_schemes
from .modules import model_bits_per_weight, replace_linear

METHODS = ("rtn", "gptq", "awq")


@dataclass
class QuantizeConfig:
    """Which scheme each linear layer gets, and how its codes are found."""

    method: str = "gptq"  # rtn | gptq | awq (activation-aware scale search, then round-to-nearest)
    default: str = "int4_g32"  # scheme of every linear layer no rule matches: int8 | int4_g<group>[_asym] | none
    rules: list[dict[str, str]] = field(default_factory=list)  # [{pattern: regex on the name, scheme: ...}]
    on_bad_group: str = "error"  # a group size that does not divide a layer's width: error | int8 (fall back)
    # A tied output head is the embedding matrix; decoding reads all of it every token. untie_head quantizes the
    # head as its own layer (rules / default apply to "lm_head") while lookups keep the float embedding.
    untie_head: bool = False
    calibration_blocks: int = 16
    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added to it
    act_order: bool = False  # gptq: columns by decreasing Hessian diagonal
    block_size: int = 128  # gptq: columns updated lazily per block
    awq_grid: int = 20  # awq: scale exponents tried in [0, 1)


def check_config(cfg: QuantizeConfig) -> None:
    """Refuse bad settings before any calibration pass; every message names its `quantize.` key."""
    if cfg.method not in METHODS:
        raise ValueError(f"quantize.method {cfg.method!r} is not one of {METHODS}")
    try:
        plan_schemes(None, list(cfg.rules), cfg.default, cfg.untie_head, cfg.on_bad_group)  # schemes and rules
    except ValueError as err:
        raise ValueError(str(err) if "quantize." in str(err) else f"quantize.default / quantize.rules: {err}") \
            from None
    for i, scheme in enumerate([cfg.default, *(r["scheme"] for r in cfg.rules)]):
        group = Scheme(scheme).group_size
        if group is not None and (group < 2 or group % 2):
            key = "quantize.default" if i == 0 else f"quantize.rules[{i - 1}].scheme"
            raise ValueError(f"{key} {scheme!r}: an int4 group size must be an even number >= 2")
    damp = cfg.damp
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:  # NaN fails too
        raise ValueError(f"quantize.damp must be in (0, 1), got {damp}")
    for name in ("calibration_blocks", "block_size", "awq_grid"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"quantize.{name} must be an integer >= 1, got {value!r}")


def plan(model: nn.Module, cfg: QuantizeConfig) -> dict[str, str]:
    """{linear name: scheme}, with group sizes checked against each layer's width before any work."""
    check_config(cfg)
    return plan_schemes(model, list(cfg.rules), cfg.default, cfg.untie_head, cfg.on_bad_group)


def _quant_module(linear: nn.Linear, scheme: str, codes) -> QuantLinear:
    return QuantLinear.from_codes(scheme, codes, linear.bias.detach() if linear.bias is not None else None)


class _Stop(Exception):
    pass


def _layer_inputs(model, calibration: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) that reach decoder layer 0 for each calibration batch."""
    captured = []

    def grab(_mod, args, kwargs):
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in calibration.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def quantize_model(model, cfg: QuantizeConfig, calibration: torch.Tensor | None = None):
    """Quantize `model` in place; returns (model, report). `calibration` `[N, T]` is needed by gptq / awq."""
    schemes = plan(model, cfg)
    report = {"method": cfg.method, "schemes": schemes}
    if not schemes:
        raise ValueError("quantize: no linear layer matches a scheme (default and rules are all 'none')")
    model.eval()
    linear_schemes = {n: s for n, s in schemes.items() if not isinstance(model.get_submodule(n), nn.Embedding)}
    if cfg.method == "rtn":
        for name, scheme in linear_schemes.items():
            lin = model.get_submodule(name)
            replace_linear(model, name, _quant_module(lin, scheme, quantize_rtn(lin.weight, scheme)))
    else:
        if calibration is None or not len(calibration):
            raise ValueError(f"quantize.method={cfg.method} needs calibration blocks")
        calibration = calibration[: cfg.calibration_blocks]
        inputs = _layer_inputs(model, calibration, batch_size=4)
        awq_alphas = {}
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            mine = {n[len(prefix):]: s for n, s in linear_schemes.items() if n.startswith(prefix)}
            if cfg.method == "awq":
                awq_alphas.update({f"{prefix}{k}": v for k, v in
                                   awq_search_and_fold(layer, inputs, mine, cfg.awq_grid).items()})
                for name, scheme in mine.items():
                    lin = layer.get_submodule(name)
                    replace_linear(layer, name, _quant_module(lin, scheme, quantize_rtn(lin.weight, scheme)))
            else:
                hessians = {n: HessianAccumulator(layer.get_submodule(n).in_features) for n in mine}
                hooks = [layer.get_submodule(n).register_forward_hook(
                    lambda m, a, o, n=n: hessians[n].add(a[0])) for n in mine]
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
                for h in hooks:
                    h.remove()
                for name, scheme in mine.items():
                    lin, s = layer.get_submodule(name), Scheme(scheme)
                    codes = gptq_quantize(lin.weight, hessians[name].value(), s.bits, s.group_size, s.symmetric,
                                          cfg.damp, cfg.act_order, cfg.block_size)
                    replace_linear(layer, name, _quant_module(lin, scheme, codes))
            # The next layer sees this layer's output with its weights already quantized.
            inputs = [((_first(layer(*args, **kwargs)),) + args[1:], kwargs) for args, kwargs in inputs]
        if awq_alphas:
            report["awq_alpha"] = awq_alphas
        for name, scheme in linear_schemes.items():  # layers outside the decoder (lm_head): round to nearest
            if not name.startswith("model.layers."):
                lin = model.get_submodule(name)
                replace_linear(model, name, _quant_module(lin, scheme, quantize_rtn(lin.weight, scheme)))
    tied = model.config.tie_word_embeddings
    for name, scheme in schemes.items():  # embedding tables (int8, round to nearest)
        emb = model.get_submodule(name)
        if isinstance(emb, nn.Embedding):
            if tied and "lm_head" not in schemes and getattr(model, "lm_head", None) is not None:
                # The head stays float: give it its own copy before the table is replaced.
                model.lm_head.weight = nn.Parameter(emb.weight.detach().clone())
            q = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, scheme)
            codes, scale = quantize_int8(emb.weight)
            q.qweight.copy_(codes)
            q.scale.copy_(scale)
            replace_linear(model, name, q)
    if tied and ("lm_head" in schemes or any(isinstance(model.get_submodule(n), QuantEmbedding) for n in schemes)):
        model.config.tie_word_embeddings = False  # head and table are now separate
    model.config.quantization_scheme = dict(schemes)
    report["bits_per_weight"] = model_bits_per_weight(model)
    return model, report


def _first(out):
    return out[0] if isinstance(out, tuple) else out
