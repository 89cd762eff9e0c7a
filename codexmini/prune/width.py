"""Width pruning of a CodexMini model: attention heads, MLP channels and the hidden size, on torch-pruning.

How the work is split:
- torch-pruning's dependency graph prunes the coupled dimensions: an MLP channel (gate and up rows with the down
  column) and a hidden channel (embedding column, every norm, every projection's input or output, the head).
  It is traced with RoPE bypassed (whole-head pruning never splits a RoPE pair; the rotation's slice-negate-concat
  makes the tracer loop forever, torch-pruning issue #527) and through a `forward_fn` with `use_cache=False`.
- Heads are pruned with torch-pruning's low-level functions: with grouped-query attention the graph couples q and
  k channel by channel and would remove no head at all. A KV group takes its k/v rows, its query heads' q rows and
  o columns (and feature-map / decay entries); a query head within a group takes its q rows and o columns.
- Importance is scored here per structure from per-weight scores (see `weight_scores`).

The pruned modules are then copied into a fresh model built from the new config (per-layer sizes) with a strict
`load_state_dict`, so config and weights are proven to agree and the result saves and reloads with
`from_pretrained`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..models import CodexMiniConfig, CodexMiniForCausalLM
from ..models import attention as attention_module
from ..models.modeling import CodexMiniRMSNorm
from ..models.quantized import weight_count

CRITERIA = ("magnitude", "taylor", "wanda", "random")
HEAD_MODES = ("kv_groups", "query_heads")
DIMS = ("heads", "mlp", "hidden")


@dataclass
class PruneConfig:
    """What to remove and how to choose it."""

    criterion: str = "wanda"  # magnitude | taylor | wanda | random
    norm: int = 2  # magnitude: L1 or L2
    # Width: fraction of each dimension to remove (0 = keep all) ...
    heads: float = 0.0
    mlp: float = 0.0
    hidden: float = 0.0
    # ... or a total parameter budget (fraction of the current parameters to keep, 0 = off); the stage then finds
    # one ratio for the dimensions in `budget_dims` that meets it.
    param_budget: float = 0.0
    budget_dims: list[str] = field(default_factory=lambda: ["heads", "mlp"])
    head_mode: str = "kv_groups"  # kv_groups: whole KV groups | query_heads: query heads evenly within groups
    round_to: int = 32  # new MLP / hidden sizes are multiples of this
    # Depth: drop this many whole layers (0 = none), by block influence or as one contiguous block (Minitron).
    drop_layers: int = 0
    depth_method: str = "block_influence"  # block_influence | contiguous
    calibration_blocks: int = 16
    seed: int = 0


def check_config(cfg: PruneConfig, config: CodexMiniConfig | None = None) -> None:
    """Refuse impossible targets before any scoring or pruning work."""
    if cfg.criterion not in CRITERIA:
        raise ValueError(f"prune.criterion {cfg.criterion!r} is not one of {CRITERIA}")
    if cfg.norm not in (1, 2):
        raise ValueError(f"prune.norm must be 1 or 2, got {cfg.norm}")
    if cfg.head_mode not in HEAD_MODES:
        raise ValueError(f"prune.head_mode {cfg.head_mode!r} is not one of {HEAD_MODES}")
    if cfg.depth_method not in ("block_influence", "contiguous"):
        raise ValueError(f"prune.depth_method {cfg.depth_method!r} is not one of block_influence, contiguous")
    for dim in DIMS:
        r = getattr(cfg, dim)
        if not 0 <= r < 1:
            raise ValueError(f"prune.{dim} = {r} must be in [0, 1): it is the fraction removed")
    if not 0 <= cfg.param_budget < 1:
        raise ValueError(f"prune.param_budget = {cfg.param_budget} must be in (0, 1) (fraction of parameters "
                         "kept) or 0 for off")
    bad = [d for d in cfg.budget_dims if d not in DIMS]
    if bad or not cfg.budget_dims:
        raise ValueError(f"prune.budget_dims {cfg.budget_dims} must be a non-empty subset of {DIMS}")
    if cfg.param_budget and any(getattr(cfg, d) for d in DIMS):
        raise ValueError("set either prune.param_budget or per-dimension ratios (heads / mlp / hidden), not both")
    for name, low in (("round_to", 1), ("drop_layers", 0), ("calibration_blocks", 1), ("seed", 0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"prune.{name} must be an integer >= {low}, got {value!r}")
    if config is None:
        return
    if cfg.drop_layers >= config.num_hidden_layers:
        raise ValueError(f"prune.drop_layers = {cfg.drop_layers} would remove all {config.num_hidden_layers} layers")
    if (cfg.hidden or "hidden" in cfg.budget_dims and cfg.param_budget) and config.embedding_rank:
        raise ValueError("hidden-size pruning of a factored embedding (embedding_rank) is not supported; prune "
                         "prune.hidden before factoring the embedding")
    for dim in DIMS:  # one dimension at a time, so the message names the ratio that leaves nothing
        if getattr(cfg, dim):
            try:
                target_sizes(config, cfg, {d: getattr(cfg, d) if d == dim else 0.0 for d in DIMS})
            except ValueError as err:
                raise ValueError(f"prune.{dim} = {getattr(cfg, dim)}: {err}") from None


def _keep(n: int, ratio: float, round_to: int = 1, what: str = "") -> int:
    """How many of `n` units to keep when removing `ratio` of them, rounded to a multiple of `round_to`."""
    keep = n - int(round(n * ratio))
    if round_to > 1 and n >= round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    if keep < 1:
        raise ValueError(f"removing {ratio:.0%} of {n} {what} leaves none; lower the ratio")
    return min(keep, n)


def uniform_sizes(config: CodexMiniConfig) -> bool:
    """Every layer has the same heads, KV heads and MLP width (so which layers are kept does not change them)."""
    return all(len(set(sizes)) == 1 for sizes in (
        config.layer_num_attention_heads, config.layer_num_key_value_heads, config.layer_intermediate_sizes))


def target_sizes(config: CodexMiniConfig, cfg: PruneConfig, ratios: dict | None = None) -> dict:
    """The per-layer sizes after pruning with `ratios` ({dim: fraction removed}, default the config's)."""
    ratios = ratios or {d: getattr(cfg, d) for d in DIMS}
    heads, kvs, inters = [], [], []
    for i in range(config.num_hidden_layers):
        h, kv, f = (config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i],
                    config.layer_intermediate_sizes[i])
        if ratios["heads"]:
            if cfg.head_mode == "kv_groups":
                new_kv = _keep(kv, ratios["heads"], what=f"KV groups of layer {i}")
                h, kv = new_kv * (h // kv), new_kv
            else:
                per = _keep(h // kv, ratios["heads"], what=f"query heads per group of layer {i}")
                h = per * kv
        heads.append(h)
        kvs.append(kv)
        inters.append(_keep(f, ratios["mlp"], cfg.round_to, f"MLP channels of layer {i}") if ratios["mlp"] else f)
    hidden = (_keep(config.hidden_size, ratios["hidden"], cfg.round_to, "hidden channels") if ratios["hidden"]
              else config.hidden_size)
    return {"hidden_size": hidden, "layer_num_attention_heads": heads, "layer_num_key_value_heads": kvs,
            "layer_intermediate_sizes": inters}


def pruned_config(config: CodexMiniConfig, sizes: dict) -> CodexMiniConfig:
    fields = config.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "num_attention_heads", "num_key_value_heads",
              "intermediate_size"):
        fields.pop(k, None)
    fields.update(sizes)
    return CodexMiniConfig(**{k: v for k, v in fields.items() if k in CodexMiniConfig.__dataclass_fields__
                              or k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")})


def budget_ratio(model, cfg: PruneConfig, goal_params: float) -> float:
    """One removal ratio for `cfg.budget_dims` so that at most `goal_params` parameters remain.

    Bisection over the ratio on the config arithmetic (feature-map and decay parameters counted as they are now,
    so the estimate errs on the small side); the result is within one `round_to` step of the budget.
    """
    config, extra = model.config, _extra_params(model)

    def params(r: float) -> int | None:
        ratios = {d: (r if d in cfg.budget_dims else 0.0) for d in DIMS}
        try:
            return pruned_config(config, target_sizes(config, cfg, ratios)).num_params_estimate() + extra
        except ValueError:  # a ratio that leaves no unit of some dimension
            return None

    lo, hi = 0.0, 0.99
    while params(hi) is None:
        hi -= 0.01
    if params(hi) > goal_params:
        raise ValueError(f"prune.param_budget cannot be met by pruning {list(cfg.budget_dims)}: at best "
                         f"{params(hi):,} parameters remain, the budget is {int(goal_params):,}; add dimensions "
                         "to prune.budget_dims, drop layers, or raise the budget")
    for _ in range(30):
        mid = (lo + hi) / 2
        n = params(mid)
        lo, hi = (lo, mid) if n is not None and n <= goal_params else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------------------------------------
# Importance


@contextmanager
def _activation_norms(model) -> Iterator[dict]:
    """Collect the squared L2 norm of every linear layer's input features over the calibration tokens."""
    norms, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, _out, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                norms[name] = norms.get(name, 0) + x.pow(2).sum(0)
            hooks.append(mod.register_forward_hook(hook))
    try:
        yield norms
    finally:
        for h in hooks:
            h.remove()


def weight_scores(model, cfg: PruneConfig, calibration: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A non-negative score per weight of every linear layer and the embedding, by name.

    magnitude: |W|^p.  taylor: |W * dL/dW| (first order, next-token loss on calibration blocks, LLM-Pruner).
    wanda: |W| * ||X_j|| with X_j the j-th input feature over calibration tokens (Wanda).  random: uniform.
    """
    named = {n: p for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2}
    if cfg.criterion == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        return {n: torch.rand(p.shape, generator=g) for n, p in named.items()}
    if cfg.criterion == "magnitude":
        return {n: p.detach().float().abs().pow(cfg.norm) for n, p in named.items()}
    if calibration is None or not len(calibration):
        raise ValueError(f"prune.criterion={cfg.criterion} needs calibration data")
    device = next(model.parameters()).device
    if cfg.criterion == "taylor":
        was = model.training
        model.zero_grad(set_to_none=True)
        for ids in calibration.split(2):
            ids = ids.to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        scores = {n: (p.detach().float() * p.grad.float()).abs() if p.grad is not None else
                  torch.zeros(p.shape) for n, p in named.items()}
        model.zero_grad(set_to_none=True)
        model.train(was)
        return scores
    with torch.no_grad(), _activation_norms(model) as norms:
        for ids in calibration.split(4):
            model(input_ids=ids.to(device), use_cache=False)
    scores = {}
    for n, p in named.items():
        mod = n[: -len(".weight")]
        if mod in norms:
            scores[n] = p.detach().float().abs() * norms[mod].sqrt()[None, :]
        else:  # the embedding: its input is one-hot, so magnitude is the activation-aware score
            scores[n] = p.detach().float().abs()
    return scores


def _rows(s: torch.Tensor, unit: int) -> torch.Tensor:
    """Sum of a score matrix's rows in units of `unit` consecutive rows, normalised to mean 1."""
    v = s.reshape(-1, unit, s.shape[1]).sum((1, 2))
    return v / v.mean().clamp(min=1e-12)


def _cols(s: torch.Tensor, unit: int) -> torch.Tensor:
    v = s.reshape(s.shape[0], -1, unit).sum((0, 2))
    return v / v.mean().clamp(min=1e-12)


def head_scores(scores: dict, prefix: str, attn, mode: str) -> torch.Tensor:
    """`[KV]` scores of KV groups, or `[KV, heads per group]` scores of query heads."""
    hd, kv, groups = attn.head_dim, attn.num_key_value_heads, attn.groups
    q = _rows(scores[f"{prefix}.q_proj.weight"], hd) + _cols(scores[f"{prefix}.o_proj.weight"], hd)  # [H]
    q = q.reshape(kv, groups)
    if mode == "query_heads":
        return q
    kvs = _rows(scores[f"{prefix}.k_proj.weight"], hd) + _rows(scores[f"{prefix}.v_proj.weight"], hd)
    return q.mean(1) + kvs


def mlp_scores(scores: dict, prefix: str) -> torch.Tensor:
    return (_rows(scores[f"{prefix}.gate_proj.weight"], 1) + _rows(scores[f"{prefix}.up_proj.weight"], 1)
            + _cols(scores[f"{prefix}.down_proj.weight"], 1))


def hidden_scores(scores: dict, model) -> torch.Tensor:
    """Per hidden channel: the embedding column, every projection's input column or output row, the head."""
    total = None
    for name, s in scores.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                          "lm_head.weight")):
            v = _cols(s, 1)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            v = _rows(s, 1)
        elif name.endswith("embed_tokens.weight"):
            v = _cols(s, 1)
        else:
            continue
        total = v if total is None else total + v
    return total


# ---------------------------------------------------------------------------------------------------------------
# Pruning


@contextmanager
def rope_bypassed() -> Iterator[None]:
    """RoPE as the identity while torch-pruning traces (see the module docstring)."""
    original = attention_module.apply_rope
    attention_module.apply_rope = lambda x, cos, sin: x
    try:
        yield
    finally:
        attention_module.apply_rope = original


def dependency_graph(model, example_ids: torch.Tensor):
    """torch-pruning's dependency graph of a CodexMini model (RMSNorm weights as unwrapped parameters)."""
    import torch_pruning as tp

    norms = [(m.weight, 0) for m in model.modules() if isinstance(m, CodexMiniRMSNorm)]
    # Per-head feature-map and decay parameters are pruned with their heads (`_prune_heads`), never by a group.
    per_head = [p for n, p in model.named_parameters() if n.endswith(("feature_map_q.weight", "feature_map_k.weight",
                                                                      "decay_logit"))]
    with rope_bypassed():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_ids,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
            unwrapped_parameters=norms, ignored_params=per_head, verbose=False)


def _drop(keep: int, scores: torch.Tensor) -> list[int]:
    """Indices of the lowest-scored units so that `keep` remain."""
    n = scores.numel()
    return sorted(scores.argsort()[: n - keep].tolist())


def _prune_heads(attn, remove_heads: list[int], remove_kv: list[int]) -> None:
    """Remove query heads `remove_heads` (and KV heads `remove_kv`) with torch-pruning's low-level functions."""
    import torch_pruning as tp

    hd = attn.head_dim
    q_idx = [h * hd + j for h in remove_heads for j in range(hd)]
    if q_idx:
        tp.prune_linear_out_channels(attn.q_proj, q_idx)
        tp.prune_linear_in_channels(attn.o_proj, q_idx)
    if remove_kv:
        kv_idx = [h * hd + j for h in remove_kv for j in range(hd)]
        tp.prune_linear_out_channels(attn.k_proj, kv_idx)
        tp.prune_linear_out_channels(attn.v_proj, kv_idx)

    def keep_index(param: torch.nn.Parameter, removed: list[int]) -> torch.nn.Parameter:
        keep = [i for i in range(param.shape[0]) if i not in set(removed)]
        return torch.nn.Parameter(param.data[keep].clone(), requires_grad=param.requires_grad)

    # Per-head parameters of linear / hybrid layers: hedgehog maps (q per query head, k per KV head), decays.
    for fm, removed in ((getattr(attn, "feature_map_q", None), remove_heads),
                        (getattr(attn, "feature_map_k", None), remove_kv)):
        if fm is not None and getattr(fm, "weight", None) is not None and removed:
            fm.weight = keep_index(fm.weight, removed)
    if getattr(attn, "decay_logit", None) is not None and remove_heads:
        attn.decay_logit = keep_index(attn.decay_logit, remove_heads)


def prune_width(model: CodexMiniForCausalLM, cfg: PruneConfig, calibration: torch.Tensor | None = None,
                sizes: dict | None = None) -> tuple[CodexMiniForCausalLM, dict]:
    """A new, narrower model (the input is left untouched) and a report of what was removed."""
    import torch_pruning as tp

    config = model.config
    sizes = sizes or target_sizes(config, cfg)
    work = copy.deepcopy(model).float().eval().requires_grad_(True)  # taylor needs gradients on every weight
    scores = weight_scores(work, cfg, calibration)
    report = {"layers": []}
    for i, layer in enumerate(work.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{i}"
        h_new, kv_new = sizes["layer_num_attention_heads"][i], sizes["layer_num_key_value_heads"][i]
        remove_heads, remove_kv = [], []
        if kv_new < attn.num_key_value_heads:
            g = attn.groups
            remove_kv = _drop(kv_new, head_scores(scores, f"{prefix}.self_attn", attn, "kv_groups"))
            remove_heads = [kv * g + j for kv in remove_kv for j in range(g)]
        elif h_new < attn.num_heads:
            per = h_new // attn.num_key_value_heads
            qs = head_scores(scores, f"{prefix}.self_attn", attn, "query_heads")  # [KV, groups]
            remove_heads = sorted(kv * attn.groups + j for kv in range(attn.num_key_value_heads)
                                  for j in _drop(per, qs[kv]))
        _prune_heads(attn, remove_heads, remove_kv)
        report["layers"].append({"removed_heads": remove_heads, "removed_kv_heads": remove_kv})
    ids = (calibration[:1, :16] if calibration is not None and len(calibration)
           else torch.randint(0, config.vocab_size, (1, 16)))
    needs_graph = sizes["hidden_size"] < config.hidden_size or any(
        a < b for a, b in zip(sizes["layer_intermediate_sizes"], config.layer_intermediate_sizes))
    if needs_graph:
        # The graph is traced after head removal, on the model as it now is.
        _sync_head_counts(work)
        graph = dependency_graph(work, ids.to(next(work.parameters()).device))
        for i, layer in enumerate(work.model.layers):
            f_new = sizes["layer_intermediate_sizes"][i]
            if f_new < layer.mlp.gate_proj.out_features:
                drop = _drop(f_new, mlp_scores(scores, f"model.layers.{i}.mlp"))
                group = graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=drop)
                group.prune()
                report["layers"][i]["removed_mlp_channels"] = len(drop)
        if sizes["hidden_size"] < config.hidden_size:
            drop = _drop(sizes["hidden_size"], hidden_scores(scores, work))
            tied = config.tie_word_embeddings and work.lm_head is not None
            group = graph.get_pruning_group(work.model.embed_tokens, tp.prune_embedding_out_channels, idxs=drop)
            group.prune()
            if tied and work.lm_head.weight.shape[1] != sizes["hidden_size"]:
                tp.prune_linear_in_channels(work.lm_head, drop)
            report["removed_hidden_channels"] = len(drop)
    new = CodexMiniForCausalLM(pruned_config(config, sizes))
    state = work.state_dict()
    if new.config.tie_word_embeddings and new.lm_head is not None:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    new.load_state_dict(state, strict=True)
    if new.config.tie_word_embeddings:
        new.tie_weights()
    return new.to(next(model.parameters()).dtype).eval(), report


def _sync_head_counts(model) -> None:
    """Keep the attention modules' head counts in step with their pruned projections (for tracing)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.num_heads = attn.q_proj.out_features // attn.head_dim
        attn.num_key_value_heads = attn.k_proj.out_features // attn.head_dim


def drop_layers(model: CodexMiniForCausalLM, cfg: PruneConfig, calibration: torch.Tensor) -> tuple[object, list]:
    """Depth pruning: remove `cfg.drop_layers` layers (lowest block influence, or the most redundant block)."""
    from ..models.from_teacher import student_from_teacher
    from .depth import block_influence, contiguous_block

    n = model.config.num_hidden_layers
    if cfg.depth_method == "contiguous":
        start = contiguous_block(model, calibration, cfg.drop_layers)
        removed = list(range(start, start + cfg.drop_layers))
    else:
        scores = block_influence(model, calibration)
        removed = sorted(sorted(range(n), key=lambda i: scores[i])[: cfg.drop_layers])
    keep = [i for i in range(n) if i not in removed]
    new = student_from_teacher(model, layers=keep, layer_types=[model.config.layer_types[i] for i in keep])
    return new, removed


def prune(model: CodexMiniForCausalLM, cfg: PruneConfig, calibration: torch.Tensor | None = None
          ) -> tuple[CodexMiniForCausalLM, dict]:
    """Depth then width pruning as configured. Returns the new model and a report (sizes, params, ratios)."""
    check_config(cfg, model.config)
    if cfg.criterion in ("taylor", "wanda") or cfg.drop_layers:
        if calibration is None or not len(calibration):
            raise ValueError(f"prune.criterion={cfg.criterion} / drop_layers need calibration blocks")
    if calibration is not None:
        calibration = calibration[: cfg.calibration_blocks]
    before = weight_count(model)
    report = {"params_before": before, "criterion": cfg.criterion}
    if cfg.drop_layers:
        model, removed = drop_layers(model, cfg, calibration)
        report["removed_layers"] = removed
    if cfg.param_budget:
        # The budget is a fraction of the model as given, depth pruning included.
        r = budget_ratio(model, cfg, cfg.param_budget * before)
        ratios = {d: (r if d in cfg.budget_dims else 0.0) for d in DIMS}
        report["budget_ratio"] = r
    else:
        ratios = {d: getattr(cfg, d) for d in DIMS}
    if any(ratios.values()):
        model, width = prune_width(model, cfg, calibration, target_sizes(model.config, cfg, ratios))
        report.update(width)
    report["params_after"] = weight_count(model)
    report["sizes"] = {"hidden_size": model.config.hidden_size, "num_hidden_layers": model.config.num_hidden_layers,
                       "layer_num_attention_heads": model.config.layer_num_attention_heads,
                       "layer_num_key_value_heads": model.config.layer_num_key_value_heads,
                       "layer_intermediate_sizes": model.config.layer_intermediate_sizes}
    return model, report


def _extra_params(model) -> int:
    """Parameters the config arithmetic leaves out (feature maps, decays): counted as they are now."""
    return weight_count(model) - model.config.num_params_estimate()
