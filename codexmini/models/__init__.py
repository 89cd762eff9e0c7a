"""The CodexMini student model, registered with the transformers Auto classes (in this one place).

`import codexmini` is enough to get the registration: `codexmini/__init__.py` imports this module as soon as
transformers is imported. Saved folders also carry the model's source and `auto_map` (`remote_code.py`), so they
load with `trust_remote_code=True` where codexmini is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import CodexMiniCache
from .configuration import CodexMiniConfig
from .modeling import CodexMiniForCausalLM, CodexMiniModel

AutoConfig.register("codexmini", CodexMiniConfig, exist_ok=True)
AutoModel.register(CodexMiniConfig, CodexMiniModel, exist_ok=True)
AutoModelForCausalLM.register(CodexMiniConfig, CodexMiniForCausalLM, exist_ok=True)

__all__ = ["CodexMiniCache", "CodexMiniConfig", "CodexMiniForCausalLM", "CodexMiniModel"]
