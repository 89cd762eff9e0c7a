"""Which quantization scheme each module gets (rules on module names), and quantization-aware training.

Both the quantize stage (which rounds the weights) and a training stage under QAT (which trains through the same
grid) need the plan, so it lives here, below the stages.

While `fake_quantized(model, schemes)` is active, each named linear layer computes with `dequantize(quantize(W))`
(the exact grid the quantize stage will use) and the gradient flows to the float W as if rounding were the
identity. Leaving it restores plain float layers holding the trained weights, ready for the quantize stage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..ops.layouts import Scheme, check_group_size, fake_quant

BAD_GROUP_ACTIONS = ("error", "int8")


def _compile_rules(rules: list[dict]) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for i, rule in enumerate(rules):
        if set(rule) != {"pattern", "scheme"}:
            raise ValueError(f"quantize.rules[{i}] must have exactly the keys pattern and scheme, got {sorted(rule)}")
        Scheme(rule["scheme"])
        try:
            compiled.append((re.compile(rule["pattern"]), rule["scheme"]))
        except re.error as err:
            raise ValueError(f"quantize.rules[{i}].pattern {rule['pattern']!r} is not a regular expression: "
                             f"{err}") from err
    return compiled


EMBED = "model.embed_tokens"  # the token table: quantized by `embedding` (or a rule naming it), tied head included
CATCH_ALL = (".*", ".+", "")  # patterns that name every linear layer but not the token table


def rule_names(pattern: str, name: str) -> bool:
    """Whether a rule's pattern names module `name` (`re.search`; a catch-all pattern does not name the table)."""
    return re.search(pattern, name) is not None and (name != EMBED or pattern not in CATCH_ALL)


def resolve_schemes(model: nn.Module, rules: list[dict], default: str = "none",
                    untie_head: bool = False, embedding: str = "none") -> dict[str, str]:
    """{module name: scheme} for every `nn.Linear`, first matching rule wins (`re.search` on the name), and for the
    token embedding table `model.embed_tokens`: a rule naming it (catch-all patterns do not) or `embedding`.

    `rules`: [{"pattern": "lm_head", "scheme": "int8"}, {"pattern": ".*", "scheme": "int4_g32"}].
    A tied head is the table: it follows the table's scheme (one quantized matrix serves lookups and the head)
    unless `untie_head`, which gives the head its own scheme from the rules / default.
    """
    compiled = _compile_rules(rules)
    Scheme(embedding)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            if name != EMBED:  # a factored table's inner lookup stays float
                continue
            scheme = next((s for rx, s in compiled if rule_names(rx.pattern, name)), embedding)
            if scheme != "none":
                out[name] = scheme
            continue
        if not isinstance(mod, nn.Linear):
            continue
        scheme = next((s for rx, s in compiled if rx.search(name)), default)
        if name == "lm_head" and tied and not untie_head:
            scheme = "none"  # the tied head is the table (quantized with it, or float with it)
        if scheme != "none":
            out[name] = scheme
    return out


def plan_schemes(model: nn.Module | None, rules: list[dict], default: str, untie_head: bool = False,
                 on_bad_group: str = "error", embedding: str = "none") -> dict[str, str]:
    """{module name: scheme} with group sizes checked against each layer's width before any work.

    With `model=None` only the settings are checked (for `validate`, before a model exists).
    """
    Scheme(default)
    Scheme(embedding)
    _compile_rules(list(rules))
    if on_bad_group not in BAD_GROUP_ACTIONS:
        raise ValueError(f"quantize.on_bad_group {on_bad_group!r} is not one of {', '.join(BAD_GROUP_ACTIONS)}")
    if model is None:
        return {}
    schemes = resolve_schemes(model, list(rules), default, untie_head, embedding)
    for name, scheme in list(schemes.items()):
        s = Scheme(scheme)
        if s.group_size is None:
            continue
        mod = model.get_submodule(name)
        width = mod.embedding_dim if isinstance(mod, nn.Embedding) else mod.in_features
        try:
            check_group_size(width, s.group_size, name, s.bits)
        except ValueError:
            if on_bad_group != "int8":
                raise
            schemes[name] = "int8"
    return schemes


def plan_problems(config, q) -> list[str]:
    """Problems of quantize section `q`'s plan for a model made from `config` (built on the meta device: its
    modules and widths, no weights), before any model exists; [] when the plan fits."""
    from .modeling import CodexMiniForCausalLM

    with torch.device("meta"):
        model = CodexMiniForCausalLM(config)
    try:
        plan_schemes(model, list(q.rules), q.default, q.untie_head, q.on_bad_group, q.embedding)
    except (ValueError, TypeError, KeyError) as err:
        return [f"quantize.default / quantize.rules: {err} (or set quantize.on_bad_group=int8 to keep such layers "
                "at int8)"]
    return []


class FakeQuant(nn.Module):
    """A weight parametrization: forward value on the grid, gradient straight through."""

    def __init__(self, scheme: str):
        super().__init__()
        self.scheme = scheme

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = fake_quant(w.detach().float(), self.scheme).to(w.dtype)
        return w + (q - w).detach()


@contextmanager
def fake_quantized(model: nn.Module, schemes: dict[str, str]) -> Iterator[nn.Module]:
    """Fake-quantize the named linear layers' weights for the duration of the block."""
    done = []
    try:
        for name, scheme in schemes.items():
            mod = model.get_submodule(name)
            parametrize.register_parametrization(mod, "weight", FakeQuant(scheme))
            done.append(mod)
        yield model
    finally:
        for mod in done:
            # Keep the trained float weights (the quantize stage rounds them afterwards).
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
