"""The names every part of codexmini validates against: the model config, the `.cmx` reader and the runtime."""

from __future__ import annotations

# What mixes the tokens in a decoder layer: softmax attention, linear attention, or a sliding softmax window plus
# linear attention over everything older (`hybrid.hybrid_attn`).
LAYER_TYPES = ("softmax", "linear", "hybrid")

# The feature maps of linear and hybrid layers (`feature_maps.feature_map`).
FEATURE_MAPS = ("elu", "relu", "hedgehog", "taylor")
