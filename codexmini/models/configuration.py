"""The CodexMini student's configuration: a Llama-shaped config plus per-layer attention types and sizes.

Saving it (which `model.save_pretrained` does) also writes the model's source into the folder and `auto_map` into
config.json, so the folder loads with `trust_remote_code=True` where codexmini is not installed
(`codexmini.models.remote_code`).
"""

from __future__ import annotations

import importlib
import json
import os

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from ..ops.names import FEATURE_MAPS, LAYER_TYPES

# config.json spells the layer types in transformers' vocabulary. transformers checks a config's `layer_types`
# against its own names whenever it reads the file without this class: AutoTokenizer, where codexmini is not
# installed, falls back to a plain PreTrainedConfig, which refuses "softmax" and "linear". In memory, and everywhere
# else in codexmini, they keep codexmini's names (`LAYER_TYPES`); files saved with those still load.
HF_LAYER_TYPES = {"softmax": "full_attention", "linear": "linear_attention", "hybrid": "hybrid"}
_FROM_HF_LAYER_TYPES = {hf: ours for ours, hf in HF_LAYER_TYPES.items()}


@strict
class CodexMiniConfig(PretrainedConfig):
    r"""Configuration of a CodexMini student.

    Field names follow `LlamaConfig` so Llama teachers map over without key tables. On top of Llama:

    Args:
        layer_types: one of `"softmax"`, `"linear"`, `"hybrid"` per layer (default: all softmax).
        layer_num_attention_heads / layer_num_key_value_heads / layer_intermediate_sizes: per-layer sizes, so a
            pruned (heterogeneous) model is representable. Left out, every layer uses the scalar field; given, the
            scalar fields are set to the largest entry.
        head_dim: its own field; `num_attention_heads * head_dim` need not equal `hidden_size`.
        embedding_rank: if set, embeddings are factored as `vocab x rank` then `rank x hidden` (ALBERT).
        feature_map: feature map of linear / hybrid layers: `elu` (elu+1), `relu`, `hedgehog`, `taylor`.
        feature_dim: hedgehog's projection width per half (default `head_dim`).
        linear_decay: a learnable per-head decay (forget gate) on the linear-attention state.
        linear_chunk_size: chunk length of the chunked parallel form.
        sliding_window: window of the softmax part of hybrid layers.
        source_layers: for a student built from a teacher, the teacher layer each student layer was copied from
            (hidden-state distillation matches them by default; depth pruning keeps it up to date).
        quantization_scheme: {linear module name: "int8" | "int4_g<group>[_asym]"}; `from_pretrained` rebuilds
            those modules as `QuantLinear` holding the packed weights (see `models/quantized.py`).

    In config.json, `layer_types` is written in transformers' names (`HF_LAYER_TYPES`: full_attention,
    linear_attention, hybrid) and read back in either spelling.
    """

    model_type = "codexmini"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_types: list | None = None
    layer_num_attention_heads: list | None = None
    layer_num_key_value_heads: list | None = None
    layer_intermediate_sizes: list | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    tie_word_embeddings: bool = True
    embedding_rank: int | None = None
    feature_map: str = "elu"
    feature_dim: int | None = None
    linear_decay: bool = False
    linear_chunk_size: int = 64
    sliding_window: int = 64
    source_layers: list | None = None
    quantization_scheme: dict | None = None

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly or choose a head count that divides it."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.layer_types = [_FROM_HF_LAYER_TYPES.get(t, t) for t in self.layer_types or ["softmax"] * n]
        self.layer_num_attention_heads = _per_layer(self.layer_num_attention_heads, self.num_attention_heads, n,
                                                    "layer_num_attention_heads")
        self.layer_num_key_value_heads = _per_layer(self.layer_num_key_value_heads, self.num_key_value_heads, n,
                                                    "layer_num_key_value_heads")
        self.layer_intermediate_sizes = _per_layer(self.layer_intermediate_sizes, self.intermediate_size, n,
                                                   "layer_intermediate_sizes")
        # The scalars summarise the lists (largest entry), so tools that read `num_attention_heads` see a bound.
        self.num_attention_heads = max(self.layer_num_attention_heads)
        self.num_key_value_heads = max(self.layer_num_key_value_heads)
        self.intermediate_size = max(self.layer_intermediate_sizes)
        super().__post_init__(**kwargs)
        self.validate_shapes()

    def validate_shapes(self) -> None:
        """Raise a ValueError naming the field if the shapes cannot make a model."""
        n = self.num_hidden_layers
        if n < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {n}")
        if len(self.layer_types) != n:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {n}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] = {t!r} is not one of {LAYER_TYPES}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map = {self.feature_map!r} is not one of {FEATURE_MAPS}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        for i in range(n):
            h, kv = self.layer_num_attention_heads[i], self.layer_num_key_value_heads[i]
            if h < 1 or kv < 1:
                raise ValueError(f"layer {i}: attention heads ({h}) and key/value heads ({kv}) must be >= 1")
            if h % kv:
                raise ValueError(
                    f"layer {i}: num_key_value_heads ({kv}) must divide num_attention_heads ({h}) "
                    "for grouped-query attention"
                )
            if self.layer_intermediate_sizes[i] < 1:
                raise ValueError(f"layer {i}: intermediate size must be >= 1, got {self.layer_intermediate_sizes[i]}")
        if self.embedding_rank is not None and not 0 < self.embedding_rank < self.hidden_size:
            raise ValueError(
                f"embedding_rank ({self.embedding_rank}) must be between 1 and hidden_size-1 ({self.hidden_size - 1}); "
                "set it to null for unfactored embeddings"
            )
        if self.source_layers is not None and len(self.source_layers) != n:
            raise ValueError(f"source_layers has {len(self.source_layers)} entries but num_hidden_layers is {n}")
        if self.linear_chunk_size < 1 or self.sliding_window < 1:
            raise ValueError("linear_chunk_size and sliding_window must be >= 1")

    def validate_layer_type(self) -> None:
        # transformers' own check knows only its attention names; ours are softmax / linear / hybrid.
        self.validate_shapes()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Save config.json and, beside it, the model's source with `auto_map` pointing at it, so the folder
        loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` without codexmini.

        With codexmini imported its registered classes load the folder as usual; `auto_map` is then unused.
        """
        if __name__ == "codexmini.models.configuration":
            # Imported by name, not by an import statement: the flattener copies every module the model code
            # imports, and the flattener itself has no place in a saved folder. The copy of this file inside a
            # folder (loaded with trust_remote_code) skips this: transformers' custom_object_save re-saves the
            # flat files that copy was loaded from.
            remote_code = importlib.import_module("codexmini.models.remote_code")
            os.makedirs(save_directory, exist_ok=True)
            remote_code.write_remote_code(save_directory)
            self.auto_map = dict(remote_code.AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write config.json, with `layer_types` in transformers' names (see `HF_LAYER_TYPES`)."""
        data = json.loads(self.to_json_string(use_diff=use_diff))
        if data.get("layer_types"):
            data["layer_types"] = [HF_LAYER_TYPES[t] for t in data["layer_types"]]
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @property
    def hedgehog_dim(self) -> int:
        return self.feature_dim or self.head_dim

    def num_params_estimate(self) -> int:
        """Parameter count implied by the config (matches `sum(p.numel())` of the built model without hedgehog)."""
        d, v = self.hidden_size, self.vocab_size
        emb = v * self.embedding_rank + self.embedding_rank * d if self.embedding_rank else v * d
        head = 0 if self.tie_word_embeddings else v * d
        total = emb + head + d
        for i in range(self.num_hidden_layers):
            h, kv, f = (self.layer_num_attention_heads[i], self.layer_num_key_value_heads[i],
                        self.layer_intermediate_sizes[i])
            total += d * self.head_dim * (2 * h + 2 * kv) + 3 * d * f + 2 * d
        return total


def _per_layer(values, default, n, name):
    if values is None:
        return [int(default)] * n
    values = [int(x) for x in values]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but num_hidden_layers is {n}")
    return values
