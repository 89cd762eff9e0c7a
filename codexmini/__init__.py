"""codexmini: distil, prune, quantize and ship small language models."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["CodexMiniCache", "CodexMiniConfig", "CodexMiniForCausalLM", "CodexMiniModel", "__version__"]


def __getattr__(name: str):
    # The model classes need transformers; importing them lazily keeps `codexmini.runtime` (torch, safetensors and
    # tokenizers only) importable on a device without it.
    if name in __all__:
        return getattr(importlib.import_module(".models", __name__), name)
    raise AttributeError(f"module 'codexmini' has no attribute {name!r}")
