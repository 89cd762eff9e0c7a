"""The on-device runtime: load a .cmx file, prefill, decode, sample. Imports only torch, safetensors, tokenizers
and the .cmx format module (`codexmini.export.cmx`)."""

from .model import Runtime, Session
from .sampling import SamplingConfig

__all__ = ["Runtime", "SamplingConfig", "Session"]
