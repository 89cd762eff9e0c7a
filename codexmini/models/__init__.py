"""The CodexMini student model, registered with the transformers Auto classes (in this one place)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import CodexMiniCache
from .configuration import CodexMiniConfig
from .modeling import CodexMiniForCausalLM, CodexMiniModel

AutoConfig.register("codexmini", CodexMiniConfig, exist_ok=True)
AutoModel.register(CodexMiniConfig, CodexMiniModel, exist_ok=True)
AutoModelForCausalLM.register(CodexMiniConfig, CodexMiniForCausalLM, exist_ok=True)

__all__ = ["CodexMiniCache", "CodexMiniConfig", "CodexMiniForCausalLM", "CodexMiniModel"]
