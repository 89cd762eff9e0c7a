"""The on-device runtime: load a .cmx file, prefill, decode, sample. Imports only torch, safetensors, tokenizers
the numerics core (`codexmini.ops`) and the .cmx format module (`codexmini.cmx`)."""

from .model import Checkpoint, Runtime, Session
from .sampling import SamplingConfig

__all__ = ["Checkpoint", "Runtime", "SamplingConfig", "Session"]
