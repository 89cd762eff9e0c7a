"""codexmini: distil, prune, quantize and ship small language models."""

from .models import CodexMiniCache, CodexMiniConfig, CodexMiniForCausalLM, CodexMiniModel

__version__ = "0.1.0"
__all__ = ["CodexMiniCache", "CodexMiniConfig", "CodexMiniForCausalLM", "CodexMiniModel", "__version__"]
