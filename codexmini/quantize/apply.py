"""Quantize a CodexMini model: pick a scheme per linear layer, compute codes (RTN, GPTQ or activation-aware),
swap in `QuantLinear` modules and record the schemes in the config so `from_pretrained` rebuilds them.

Calibrated methods run the decoder layer by layer: the calibration blocks' hidden states enter layer i as the
already-quantized layers 0..i-1 produce them, so each layer corrects for the error upstream of it (as GPTQ does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.qat import EMBED, plan_schemes, rule_names
from ..models.quantized import QuantEmbedding, QuantLinear
from ..ops.layouts import Scheme, quantize_rtn
from .allocate import CalibrationStats, allocate, collect_stats, head_importance, tensor_bytes
from .awq import awq_search_and_fold
from .gptq import HessianAccumulator, gptq_quantize
from .modules import model_bits_per_weight, replace_linear

METHODS = ("rtn", "gptq", "awq")
# int4_g8 (6 bits a weight): the step between int4_g16 (5) and int8 (8)
DEFAULT_CANDIDATES = ("int2_g32_asym", "int3_g32", "int3_g16", "int4_g64", "int4_g32", "int4_g32_asym", "int4_g16",
                      "int4_g8", "int8")
# Grids a tensor's weights may already sit on exactly (llama.cpp's Q4_1 is int4_g32_min: a teacher that came from
# such a file). Where requantizing onto one is exact, it joins that tensor's candidates at no estimated loss; where
# the weights only lie near it (a student fine-tuned from such a teacher) it stays out: snapping them back undoes
# what training moved, which a per-weight error estimate cannot see.
DEFAULT_GRID_SCHEMES = ("int4_g32_min",)
# A .cmx header beyond its JSON strings (tokenizer, chat template, config): per tensor an index entry
# ({"dtype", "shape", "data_offsets"} under its name: ~107 bytes for SmolLM2's names), per weight matrix an entry in
# the schemes map (~50), and a few fixed keys (format, version, checksum) and safetensors' padding; each with room
# to spare.
INDEX_ENTRY_BYTES = 160
SCHEME_ENTRY_BYTES = 80
HEADER_FIXED_BYTES = 4096


@dataclass
class QuantizeConfig:
    """Which scheme each linear layer (and the token table) gets, and how its codes are found."""

    method: str = "gptq"  # rtn | gptq | awq (activation-aware scale search, then round-to-nearest)
    default: str = "int4_g32"  # scheme of every linear layer no rule matches: int8 | int<b>_g<group>[_asym] | none
    rules: list[dict[str, str]] = field(default_factory=list)  # [{pattern: regex on the name, scheme: ...}]
    # The token embedding table; a tied head is this same quantized matrix (stored once, read by decoding).
    embedding: str = "int8"
    on_bad_group: str = "error"  # a group size that does not divide a layer's width: error | int8 (fall back)
    # A tied head is the embedding matrix; untie_head quantizes the head as its own layer (rules / default apply to
    # "lm_head") while lookups keep the table in its `embedding` scheme.
    untie_head: bool = False
    # Each group's grid searched for the least activation-weighted error (else round to nearest on its range).
    search: bool = True
    # A size budget instead of fixed schemes: every tensor no rule pins gets the candidate scheme that minimises
    # the estimated loss increase within the budget (see quantize/allocate.py). At most one of the two.
    target_mb: float | None = None  # megabytes (10^6 bytes) of the exported .cmx (weights, tokenizer, metadata)
    target_bits: float | None = None  # stored bits per weight, averaged over every weight of the model
    candidates: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    grid_schemes: list[str] = field(default_factory=lambda: list(DEFAULT_GRID_SCHEMES))  # see DEFAULT_GRID_SCHEMES
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
        Scheme(cfg.embedding)
    except ValueError as err:
        raise ValueError(f"quantize.embedding: {err}") from None
    try:
        plan_schemes(None, list(cfg.rules), cfg.default, cfg.untie_head, cfg.on_bad_group)  # schemes and rules
    except ValueError as err:
        raise ValueError(str(err) if "quantize." in str(err) else f"quantize.default / quantize.rules: {err}") \
            from None
    named = [("quantize.default", cfg.default), ("quantize.embedding", cfg.embedding),
             *((f"quantize.rules[{i}].scheme", r["scheme"]) for i, r in enumerate(cfg.rules))]
    for key, scheme in named:
        s = Scheme(scheme)
        step = 2 if s.bits == 4 else 8
        if s.group_size is not None and (s.group_size < step or s.group_size % step):
            raise ValueError(f"{key} {scheme!r}: an int{s.bits} group size must be a multiple of {step}"
                             f"{' (and >= 2)' if step == 2 else ''}")
    damp = cfg.damp
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:  # NaN fails too
        raise ValueError(f"quantize.damp must be in (0, 1), got {damp}")
    for name in ("calibration_blocks", "block_size", "awq_grid"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"quantize.{name} must be an integer >= 1, got {value!r}")
    if cfg.target_mb is not None and cfg.target_bits is not None:
        raise ValueError("quantize.target_mb and quantize.target_bits are both set; give one size budget")
    for name in ("target_mb", "target_bits"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < float("inf")):
            raise ValueError(f"quantize.{name} must be a positive number or null, got {value!r}")
    if not cfg.candidates:
        raise ValueError("quantize.candidates is empty: list the schemes a size budget may choose from")
    for key, names in (("candidates", cfg.candidates), ("grid_schemes", cfg.grid_schemes)):
        for i, c in enumerate(names):
            try:
                if Scheme(c).bits == 32:
                    raise ValueError("'none' keeps a float layer and is no candidate")
            except ValueError as err:
                raise ValueError(f"quantize.{key}[{i}]: {err}") from None


def plan(model: nn.Module, cfg: QuantizeConfig) -> dict[str, str]:
    """{module name: scheme}, with group sizes checked against each layer's width before any work."""
    check_config(cfg)
    return plan_schemes(model, list(cfg.rules), cfg.default, cfg.untie_head, cfg.on_bad_group, cfg.embedding)


def _pinned(cfg: QuantizeConfig, schemes: dict[str, str]) -> set[str]:
    """The planned tensors a rule names (a size budget leaves them as the rule says)."""
    return {name for name in schemes if any(rule_names(r["pattern"], name) for r in cfg.rules)}


def budget_bytes(model: nn.Module, cfg: QuantizeConfig, schemes: dict[str, str], reserved_bytes: int = 0) -> float:
    """Bytes the budget leaves for the quantized tensors: the target minus the float tensors (at fp16, as a `.cmx`
    export stores them) and, for `target_mb` (a file size), `reserved_bytes` (tokenizer, header, metadata)."""
    weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    total = cfg.target_mb * 1e6 - reserved_bytes if cfg.target_mb is not None else cfg.target_bits * weights / 8
    counted = set(schemes)
    floats = 0
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in counted and not (owner == "lm_head" and EMBED in counted
                                         and model.config.tie_word_embeddings and "lm_head" not in counted):
            floats += p.numel() * 2
    return total - floats


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
def quantize_model(model, cfg: QuantizeConfig, calibration: torch.Tensor | None = None, reserved_bytes: int = 0):
    """Quantize `model` in place; returns (model, report). `calibration` `[N, T]` is needed by gptq / awq and by a
    size budget; with it, round-to-nearest weighs its grid search by the measured activation importances.
    `reserved_bytes`: what the file holds besides tensors (see `file_overhead_bytes`), taken off `target_mb`."""
    schemes = plan(model, cfg)
    report: dict = {"method": cfg.method}
    if not schemes:
        raise ValueError("quantize: no linear layer matches a scheme (default and rules are all 'none')")
    budget = cfg.target_mb is not None or cfg.target_bits is not None
    if calibration is not None and len(calibration):
        calibration = calibration[: cfg.calibration_blocks]
    elif cfg.method != "rtn" or budget:
        raise ValueError(f"quantize: {'a size budget' if budget else f'method={cfg.method}'} needs calibration "
                         "blocks (data.calibration)")
    else:
        calibration = None
    model.eval()
    stats = CalibrationStats()
    if calibration is not None:
        with torch.enable_grad():
            stats = collect_stats(model, calibration, list(schemes), fisher=budget)
    if budget:
        pinned = _pinned(cfg, schemes)
        free = [n for n in schemes if n not in pinned]
        left = budget_bytes(model, cfg, schemes, reserved_bytes) - \
            sum(tensor_bytes(model, n, schemes[n]) for n in pinned)
        chosen, report["allocation"] = allocate(model, free, list(cfg.candidates), left, stats,
                                                list(cfg.grid_schemes))
        schemes.update(chosen)
    report["schemes"] = schemes
    linear_schemes = {n: s for n, s in schemes.items() if n != EMBED}
    if cfg.method == "rtn":
        for name, scheme in linear_schemes.items():
            lin = model.get_submodule(name)
            codes = quantize_rtn(lin.weight, scheme, stats.importance.get(name), cfg.search)
            replace_linear(model, name, _quant_module(lin, scheme, codes))
    else:
        inputs = _layer_inputs(model, calibration, batch_size=4)
        awq_alphas = {}
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            mine = {n[len(prefix):]: s for n, s in linear_schemes.items() if n.startswith(prefix)}
            if cfg.method == "awq":
                awq_alphas.update({f"{prefix}{k}": v for k, v in
                                   awq_search_and_fold(layer, inputs, mine, cfg.awq_grid).items()})
                imps = _importances(layer, inputs, mine) if cfg.search else {}
                for name, scheme in mine.items():
                    lin = layer.get_submodule(name)
                    codes = quantize_rtn(lin.weight, scheme, imps.get(name), cfg.search)
                    replace_linear(layer, name, _quant_module(lin, scheme, codes))
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
                    codes = gptq_quantize(lin.weight, hessians[name].value(), s.bits, s.group_size, s.mode,
                                          cfg.damp, cfg.act_order, cfg.block_size, cfg.search)
                    replace_linear(layer, name, _quant_module(lin, scheme, codes))
            # The next layer sees this layer's output with its weights already quantized.
            inputs = [((_first(layer(*args, **kwargs)),) + args[1:], kwargs) for args, kwargs in inputs]
        if awq_alphas:
            report["awq_alpha"] = awq_alphas
        for name, scheme in linear_schemes.items():  # layers outside the decoder (lm_head): round to nearest
            if not name.startswith("model.layers."):
                lin = model.get_submodule(name)
                codes = quantize_rtn(lin.weight, scheme, stats.importance.get(name), cfg.search)
                replace_linear(model, name, _quant_module(lin, scheme, codes))
    tied = model.config.tie_word_embeddings
    if EMBED in schemes:
        emb, scheme = model.get_submodule(EMBED), schemes[EMBED]
        head_is_table = tied and not cfg.untie_head
        if tied and not head_is_table and isinstance(getattr(model, "lm_head", None), nn.Linear):
            model.lm_head.weight = nn.Parameter(emb.weight.detach().clone())  # untied: the head keeps its copy
        imp = head_importance(stats.importance.get(EMBED)) if head_is_table else None
        q = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, scheme)
        q.load_codes(quantize_rtn(emb.weight.detach(), scheme, imp, cfg.search))
        replace_linear(model, EMBED, q)
        if head_is_table:
            model.lm_head = None  # the quantized table is the head (QuantEmbedding.unembed)
            model._tied_weights_keys = {}
    if tied and cfg.untie_head and ("lm_head" in schemes or EMBED in schemes):
        model.config.tie_word_embeddings = False  # head and table are now separate
    model.config.quantization_scheme = dict(schemes)
    report["bits_per_weight"] = model_bits_per_weight(model)
    return model, report


def file_overhead_bytes(tokenizer, model: nn.Module | None = None) -> int:
    """Bytes a `.cmx` of `model` with `tokenizer` holds besides its tensors' bytes, at most: its safetensors header,
    where tokenizer.json, the chat template and the config are JSON strings (escaped: SmolLM2's 1.49 MB tokenizer
    takes 1.86 MB there), an index entry per tensor (three per weight matrix once quantized: codes, scale, zero), a
    scheme per weight matrix, and the fixed keys."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    strings = [backend.to_str() if backend is not None else "", str(getattr(tokenizer, "chat_template", None) or "")]
    tensors = matrices = 0
    if model is not None:
        strings.append(json.dumps(model.config.to_dict(), sort_keys=True, default=str))
        for p in {id(p): p for p in model.parameters()}.values():
            matrices += p.dim() == 2
            tensors += 3 if p.dim() == 2 else 1
    escaped = sum(len(json.dumps(s, ensure_ascii=False).encode()) for s in strings)
    return escaped + INDEX_ENTRY_BYTES * tensors + SCHEME_ENTRY_BYTES * matrices + HEADER_FIXED_BYTES


def _importances(layer: nn.Module, inputs: list, names: dict) -> dict[str, torch.Tensor]:
    """Mean squared input per column of each named linear layer of `layer` on its calibration inputs."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_mod, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for args, kwargs in inputs:
            layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def _first(out):
    return out[0] if isinstance(out, tuple) else out
