"""Activation-aware scaling (AWQ, Lin et al. 2023): before rounding, scale up the input channels that carry large
activations so their weights lose less precision, and fold the inverse scale into the operation that produces
those inputs, so the float function is unchanged.

Per decoder layer, three groups share an input: q/k/v (scale folded into the attention norm), gate/up (into the
MLP norm) and down (into up's output rows). o_proj is left as is: with grouped-query attention its input channels
are repeats of v's, so a per-channel scale cannot be folded into v. For each group the exponent alpha of
`s = mean|x|^alpha` is searched on a grid, minimising the group's output error after quantization on the
calibration activations.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.layouts import fake_quant

GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp.up_proj", ("mlp.down_proj",)))


@torch.no_grad()
def awq_search_and_fold(layer: nn.Module, inputs: list, schemes: dict[str, str], grid: int = 20,
                        max_rows: int = 4096) -> dict[str, float]:
    """Search and fold the scales of one decoder layer in place; returns the chosen alpha per group."""
    wanted = {names[0]: names for _, names in GROUPS if all(n in schemes for n in names)}
    if not wanted:
        return {}
    xs: dict[str, list] = {n: [] for n in wanted}
    hooks = [layer.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: xs[n].append(
        a[0].detach().reshape(-1, a[0].shape[-1]).float())) for n in wanted]
    for args, kwargs in inputs:
        layer(*args, **kwargs)
    for h in hooks:
        h.remove()
    chosen = {}
    for prev_name, names in GROUPS:
        if names[0] not in wanted:
            continue
        x = torch.cat(xs[names[0]])
        if len(x) > max_rows:
            x = x[torch.linspace(0, len(x) - 1, max_rows).long()]
        mean_abs = x.abs().mean(0).clamp(min=1e-8)
        linears = [layer.get_submodule(n) for n in names]
        refs = [x @ lin.weight.float().t() for lin in linears]
        best, best_err, best_s = 0.0, None, None
        for k in range(grid):
            alpha = k / grid
            s = mean_abs.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            err = 0.0
            for lin, ref, n in zip(linears, refs, names):
                wq = fake_quant(lin.weight.float() * s[None, :], schemes[n]) / s[None, :]
                err += float((x @ wq.t() - ref).pow(2).mean())
            if best_err is None or err < best_err:
                best, best_err, best_s = alpha, err, s
        if best > 0:
            for lin in linears:
                lin.weight.mul_(best_s[None, :].to(lin.weight.dtype))
            prev = layer.get_submodule(prev_name)
            if isinstance(prev, nn.Linear):  # up_proj: scale its output rows
                prev.weight.div_(best_s[:, None].to(prev.weight.dtype))
                if prev.bias is not None:
                    prev.bias.div_(best_s.to(prev.bias.dtype))
            else:  # an RMSNorm: scale its weight
                prev.weight.div_(best_s.to(prev.weight.dtype))
        chosen[names[0]] = best
    return chosen
