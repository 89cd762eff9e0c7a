"""Choosing a quantization scheme per module by pattern, swapping modules, and counting storage bits."""

from __future__ import annotations

import re

from torch import nn

from ..models.quantized import QuantEmbedding, QuantLinear, Scheme


def resolve_schemes(model: nn.Module, rules: list[dict], default: str = "none",
                    untie_head: bool = False) -> dict[str, str]:
    """{module name: scheme} for every `nn.Linear`, first matching rule wins (`re.search` on the name).

    `rules`: [{"pattern": "lm_head", "scheme": "int8"}, {"pattern": ".*", "scheme": "int4_g32"}].
    """
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
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            # Embedding tables only by an explicit rule (the default is for linear layers), int8 only.
            scheme = next((s for rx, s in compiled if rx.search(name) and rx.pattern not in (".*", ".+", "")),
                          "none")
            if scheme not in ("none", "int8"):
                raise ValueError(f"{name}: embedding tables support int8 only, a rule gives {scheme!r}")
            if scheme != "none" and tied and not untie_head:
                raise ValueError(f"{name} is tied to the output head: quantizing it needs untie_head: true (the "
                                 "head then gets its own scheme, or stays a float copy)")
            if scheme != "none":
                out[name] = scheme
            continue
        if not isinstance(mod, nn.Linear):
            continue
        scheme = next((s for rx, s in compiled if rx.search(name)), default)
        if name == "lm_head" and tied and not untie_head:
            scheme = "none"  # the tied head is the embedding: quantizing it unties it, only when asked
        if scheme != "none":
            out[name] = scheme
    return out


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def model_bits_per_weight(model: nn.Module) -> float:
    """Storage bits of all weights (quantized buffers with scales and zero points, float parameters as stored)
    over the number of weights the float model has."""
    bits, weights = 0, 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            bits += mod.storage_bits()
            weights += mod.in_features * mod.out_features
            continue
        if isinstance(mod, QuantEmbedding):
            bits += mod.storage_bits()
            weights += mod.num_embeddings * mod.embedding_dim
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            bits += p.numel() * p.element_size() * 8
            weights += p.numel()
    return bits / max(weights, 1)
