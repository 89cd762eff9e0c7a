"""Bits where they matter: calibration statistics, per-tensor sensitivity to each scheme, and the allocation of
schemes that meets a size budget with the least estimated loss.

Statistics come from one forward and backward pass of the float model over the calibration blocks (next-token
cross-entropy on the blocks' own text):

- the importance of each input column of a linear layer: the mean square of the activations it multiplies
  (llama.cpp's importance matrix; also what weighs the grid search of `search_grid`);
- the Fisher weight of each output row: the mean square of the loss gradient at that output.

- for a sample of the calibration tokens (`FISHER_TOKENS`), each layer's input x_t and output gradient g_t.

To second order (the empirical Fisher as curvature), quantizing weight W to W + dW raises the loss by about
`E = 1/2 mean_t (g_t^T dW x_t)^2`, which is comparable across layers because every g is a gradient of the same
loss (per token). It is measured on the token sample; the full calibration set gives the diagonal approximation
`1/2 sum_o G_o * sum_j I_j * dW_oj^2` (G: output Fisher weights, I: input importances), equal to it in
expectation when the rounding errors are independent, and E is the larger of the two. The sample matters where the
errors are not independent: a student fine-tuned from a teacher whose weights sat on a grid keeps most of them near
it, and a scheme that snaps them back onto that grid has a tiny squared error that undoes exactly what training
moved, along the directions the gradients point (the diagonal cannot see that; the products g^T dW x do). For the
token table the lookups add `1/2 mean_t sum_d g_td^2 dE[id_t, d]^2` (the gradient at each looked-up row).
`allocate` then picks one scheme per tensor minimising the summed E under the byte budget, by a Lagrangian search over the price of a byte (the classic
multiple-choice knapsack relaxation: each tensor takes the scheme minimising E + price * bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..ops.layouts import Scheme, fake_quant

EMBED = "model.embed_tokens"
FISHER_TOKENS = 512  # calibration tokens whose inputs and output gradients are kept per layer (the exact quadratic)


@dataclass
class CalibrationStats:
    """Per-tensor statistics of the float model on the calibration blocks (see the module docstring)."""

    importance: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [in] mean x^2
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [out] mean g^2 (when computed)
    lookup_ids: torch.Tensor | None = None  # token ids looked up (flattened)
    lookup_fisher: torch.Tensor | None = None  # [n, d] squared gradient at each looked-up row
    sample_x: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S, in] inputs of sampled tokens
    sample_g: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S, out] their output gradients
    tokens: int = 0


def collect_stats(model: nn.Module, calibration: torch.Tensor, names: list[str], fisher: bool,
                  batch_size: int = 4) -> CalibrationStats:
    """Importances (and, with `fisher`, output Fisher weights and a token sample's inputs and output gradients) of
    the named linear layers; `EMBED` in `names` means the token table: as the head (the input of `lm_head`, or of
    the final norm's output when the head is the table) and as lookups. Gradients are per token: each batch's
    (mean) loss gradient times its number of tokens."""
    stats = CalibrationStats()
    sums: dict[str, torch.Tensor] = {}
    gsums: dict[str, torch.Tensor] = {}
    xs: dict[str, list[torch.Tensor]] = {}
    gs: dict[str, list[torch.Tensor]] = {}
    device = next(model.parameters()).device
    handles = []
    stride = max(1, calibration.numel() // FISHER_TOKENS)  # every stride-th token of the flattened blocks
    batch = {"tokens": 1, "first": 0}  # the current batch's token count (its loss is their mean) and first index

    def add(store, key, value):
        value = value.detach().reshape(-1, value.shape[-1]).double().pow(2).sum(0).cpu()
        store[key] = store[key] + value if key in store else value

    def picked(t):
        t = t.detach().reshape(-1, t.shape[-1])
        start = (-batch["first"]) % stride
        return t[start::stride].float().cpu()

    def add_grad(key, g, x):
        g = g.detach() * batch["tokens"]
        add(gsums, key, g)
        gs.setdefault(key, []).append(picked(g))
        xs.setdefault(key, []).append(picked(x))

    def watch(key, module):
        def hook(_mod, args, out):
            add(sums, key, args[0])
            if fisher and out.requires_grad:
                out.register_hook(lambda g, x=args[0]: add_grad(key, g, x))
        handles.append(module.register_forward_hook(hook))

    for name in names:
        if name != EMBED:
            watch(name, model.get_submodule(name))
    head = getattr(model, "lm_head", None)
    if EMBED in names and head is not None:
        watch(EMBED, head)  # a tied float head shares the table's weight: its input is the table's head input
    elif EMBED in names:
        def norm_hook(_mod, _args, out):
            add(sums, EMBED, out)
        handles.append(model.model.norm.register_forward_hook(norm_hook))
    lookups: list[tuple[torch.Tensor, torch.Tensor]] = []
    embed = model.get_input_embeddings()

    def embed_hook(_mod, args, out):
        if not fisher:
            return None
        out = out.detach().requires_grad_(True)  # gradients flow from here (no parameter needs one)
        ids = args[0].detach().reshape(-1).cpu()
        out.register_hook(lambda g: lookups.append(
            (ids, (g.detach().reshape(-1, g.shape[-1]) * batch["tokens"]).float().pow(2).cpu())))
        return out

    handles.append(embed.register_forward_hook(embed_hook))
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for ids in tqdm(calibration.split(batch_size), desc="[codexmini] calibration statistics", leave=False):
            ids = ids.to(device)
            batch["tokens"] = ids.numel()
            with torch.set_grad_enabled(fisher):
                out = model(input_ids=ids, labels=ids if fisher else None, use_cache=False)
                if fisher:
                    out.loss.backward()
            stats.tokens += ids.numel()
            batch["first"] += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    n = max(stats.tokens, 1)
    stats.importance = {k: (v / n).float() for k, v in sums.items()}
    stats.fisher = {k: (v / n).float() for k, v in gsums.items()}
    stats.sample_x = {k: torch.cat(v) for k, v in xs.items()}
    stats.sample_g = {k: torch.cat(v) for k, v in gs.items()}
    if lookups:
        stats.lookup_ids = torch.cat([i for i, _ in lookups])
        stats.lookup_fisher = torch.cat([g for _, g in lookups])
    return stats


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().float()


def quant_error(w: torch.Tensor, scheme: str, importance: torch.Tensor | None, search: bool) -> torch.Tensor:
    """`dequantize(quantize(w)) - w` for `scheme` (its grid searched with `importance` when `search`)."""
    return fake_quant(w, scheme, importance, search) - w


def sensitivity(model: nn.Module, name: str, scheme: str, stats: CalibrationStats, search: bool) -> float:
    """Estimated loss increase of quantizing tensor `name` in `scheme` (the module docstring's E)."""
    w = weight_of(model, name)
    imp = stats.importance.get(name)
    dw = quant_error(w, scheme, head_importance(imp) if name == EMBED else imp, search)
    err = dw.pow(2)
    rows = err @ (imp if imp is not None else torch.ones(w.shape[1]))
    g = stats.fisher.get(name)
    e = 0.5 * float(rows @ g) if g is not None else float(rows.sum())
    x, gt = stats.sample_x.get(name), stats.sample_g.get(name)
    if x is not None and gt is not None and len(x):
        e = max(e, 0.5 * float(((x @ dw.t()) * gt).sum(-1).pow(2).mean()))  # the exact form on the sample
    if name == EMBED and stats.lookup_ids is not None:
        e += 0.5 * float((err[stats.lookup_ids] * stats.lookup_fisher).sum()) / max(stats.tokens, 1)
    return e


def head_importance(importance: torch.Tensor | None) -> torch.Tensor | None:
    """The search weights of a tied table: the head's input importance (normalised to mean 1) plus a uniform part
    for the lookups, which read every column alike."""
    if importance is None:
        return None
    return importance / importance.mean().clamp(min=1e-30) + 1.0


def tensor_bytes(model: nn.Module, name: str, scheme: str) -> float:
    mod = model.get_submodule(name)
    out, inp = (mod.num_embeddings, mod.embedding_dim) if isinstance(mod, nn.Embedding) else \
        (mod.out_features, mod.in_features)
    return out * inp * Scheme(scheme).bits_per_weight(inp) / 8


def on_grid(w: torch.Tensor, scheme: str) -> bool:
    """Whether `w` requantizes onto `scheme` bit for bit (its weights already sit on that grid)."""
    s = Scheme(scheme)
    if s.group_size is not None and w.shape[1] % s.group_size:
        return False
    return torch.equal(fake_quant(w, scheme), w)


def allocate(model: nn.Module, names: list[str], candidates: list[str], budget_bytes: float,
             stats: CalibrationStats, grid_schemes: list[str] = ()) -> tuple[dict[str, str], dict]:
    """One scheme per tensor in `names`, from the `candidates` each tensor admits (and the `grid_schemes` its
    weights sit on exactly, `on_grid`), with total bytes within `budget_bytes` and the least summed sensitivity.
    Returns ({name: scheme}, a report; its "on_grid" counts the tensors that sat on each grid scheme)."""
    options: dict[str, list[tuple[str, float, float]]] = {}
    exact: dict[str, int] = {}
    for name in tqdm(names, desc="[codexmini] sensitivity per tensor and scheme", leave=False):
        mod = model.get_submodule(name)
        width = mod.embedding_dim if isinstance(mod, nn.Embedding) else mod.in_features
        usable = [c for c in candidates if Scheme(c).group_size is None or width % Scheme(c).group_size == 0]
        for g in grid_schemes:
            if g not in usable and on_grid(weight_of(model, name), g):
                usable.append(g)
                exact[g] = exact.get(g, 0) + 1
        if not usable:
            usable = ["int8"]
        # estimated on the round-to-nearest grid (the search's gain is similar across schemes, and costs 30x)
        options[name] = [(c, tensor_bytes(model, name, c), sensitivity(model, name, c, stats, False))
                         for c in usable]
    smallest = sum(min(b for _, b, _ in opts) for opts in options.values())
    if smallest > budget_bytes:
        raise ValueError(f"quantize: the size budget leaves {budget_bytes / 1e6:.2f} MB for the quantized tensors, "
                         f"but the smallest candidates ({', '.join(candidates)}) need {smallest / 1e6:.2f} MB; raise "
                         "quantize.target_mb / target_bits or add a smaller scheme to quantize.candidates")

    def pick(price: float) -> dict[str, tuple[str, float, float]]:
        return {n: min(opts, key=lambda o: (o[2] + price * o[1], o[1])) for n, opts in options.items()}

    lo, hi = 0.0, 1.0
    while sum(o[1] for o in pick(hi).values()) > budget_bytes:
        hi *= 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(o[1] for o in pick(mid).values()) > budget_bytes:
            lo = mid
        else:
            hi = mid
    chosen = pick(hi)
    # spend what the relaxation leaves: the best loss-per-byte upgrades that still fit
    spent = sum(o[1] for o in chosen.values())
    while True:
        best = None
        for n, opts in options.items():
            cur = chosen[n]
            for o in opts:
                extra = o[1] - cur[1]
                if extra > 0 and o[2] < cur[2] and spent + extra <= budget_bytes:
                    gain = (cur[2] - o[2]) / extra
                    if best is None or gain > best[0]:
                        best = (gain, n, o, extra)
        if best is None:
            break
        _, n, o, extra = best
        chosen[n], spent = o, spent + extra
    schemes = {n: o[0] for n, o in chosen.items()}
    counts: dict[str, int] = {}
    for s in schemes.values():
        counts[s] = counts.get(s, 0) + 1
    report = {"budget_mb": budget_bytes / 1e6, "quantized_mb": spent / 1e6, "counts": counts,
              "estimated_loss_increase": sum(o[2] for o in chosen.values()),
              "sensitivity": {n: {c: e for c, _, e in opts} for n, opts in options.items()}, "on_grid": exact}
    return schemes, report
