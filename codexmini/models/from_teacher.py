"""Build a student from a Llama-style teacher: copy embeddings, norms and a chosen subset of layers.

Chosen layers can be turned from softmax into linear or hybrid attention while keeping their q/k/v/o weights:
the starting point of linearization (LoLCATs). The new feature-map / decay parameters start at their own init
and are what attention transfer trains first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from transformers import PreTrainedModel

from .configuration import CodexMiniConfig
from .modeling import CodexMiniForCausalLM

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, Mapping) else "default"
    if rope_type != "default":
        raise ValueError(f"teacher uses RoPE scaling {rope_type!r}; only plain RoPE ('default') is supported")
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    return float(theta or getattr(cfg, "rope_theta", 10000.0))


def student_config_from_teacher(teacher_config, layers: Sequence[int] | None = None,
                                layer_types: Sequence[str] | Mapping[int, str] | None = None,
                                **overrides) -> CodexMiniConfig:
    """A CodexMini config with the teacher's shapes, keeping `layers` (teacher indices, default all).

    `layer_types` is a list over the kept layers, or a mapping {student layer index: type}; others stay softmax.
    `overrides` set any other CodexMini field (feature_map, sliding_window, linear_decay, ...).
    """
    tc = teacher_config
    n_teacher = tc.num_hidden_layers
    layers = list(range(n_teacher)) if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} are not valid teacher layer indices (teacher has {n_teacher} layers)")
    n = len(layers)
    if layer_types is None:
        types = ["softmax"] * n
    elif isinstance(layer_types, Mapping):
        types = ["softmax"] * n
        for i, t in layer_types.items():
            if not 0 <= int(i) < n:
                raise ValueError(f"layer_types key {i} is outside the {n} student layers")
            types[int(i)] = t
    else:
        types = list(layer_types)
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise ValueError(f"teacher hidden_act {tc.hidden_act!r} is not supported; the student uses SwiGLU (silu)")
    if tc.model_type == "codexmini":
        heads = [tc.layer_num_attention_heads[i] for i in layers]
        kv = [tc.layer_num_key_value_heads[i] for i in layers]
        inter = [tc.layer_intermediate_sizes[i] for i in layers]
        extra = {k: getattr(tc, k) for k in ("feature_map", "feature_dim", "linear_decay", "sliding_window",
                                            "linear_chunk_size", "embedding_rank")}
    else:
        heads = [tc.num_attention_heads] * n
        kv = [getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads] * n
        inter = [tc.intermediate_size] * n
        extra = {}
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    fields = dict(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_hidden_layers=n, head_dim=head_dim,
        num_attention_heads=max(heads), num_key_value_heads=max(kv), intermediate_size=max(inter),
        layer_num_attention_heads=heads, layer_num_key_value_heads=kv, layer_intermediate_sizes=inter,
        layer_types=types, rms_norm_eps=tc.rms_norm_eps, rope_theta=_rope_theta(tc),
        max_position_embeddings=tc.max_position_embeddings, tie_word_embeddings=tc.tie_word_embeddings,
        attention_bias=getattr(tc, "attention_bias", False), mlp_bias=getattr(tc, "mlp_bias", False),
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
        # Relative to the original teacher when the source is itself a student (e.g. depth pruning).
        source_layers=([int(tc.source_layers[i]) for i in layers] if getattr(tc, "source_layers", None)
                       else list(layers)),
        **extra,
    )
    fields.update(overrides)
    return CodexMiniConfig(**fields)


def student_from_teacher(teacher: PreTrainedModel, layers: Sequence[int] | None = None,
                         layer_types: Sequence[str] | Mapping[int, str] | None = None,
                         **overrides) -> CodexMiniForCausalLM:
    """Copy the teacher's weights into a CodexMini student (see `student_config_from_teacher`).

    Works for any Llama-named model (Llama, SmolLM, Mistral without sliding windows, a CodexMini model). With all
    layers kept as softmax, the student computes the same function as the teacher.
    """
    if overrides.get("embedding_rank"):
        raise ValueError("student_from_teacher copies full embeddings; factor them afterwards (embedding_rank=None)")
    config = student_config_from_teacher(teacher.config, layers, layer_types, **overrides)
    kept = list(range(teacher.config.num_hidden_layers)) if layers is None else [int(i) for i in layers]
    where = {src: dst for dst, src in enumerate(kept)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in where:
            state[f"model.layers.{where[int(m.group(1))]}.{m.group(2)}"] = value
    student = CodexMiniForCausalLM(config)
    student.to(next(teacher.parameters()).dtype)
    result = student.load_state_dict(state, strict=False)
    # Only parameters that softmax attention lacks may be missing: feature maps and decays of converted layers.
    missing = [k for k in result.missing_keys
               if not re.search(r"feature_map_[qk]\.weight$|decay_logit$", k)
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"teacher weights do not fit the student: missing {missing[:5]}, unexpected {unexpected[:5]}"
                         " (is the teacher Llama-shaped with Llama parameter names?)")
    if config.tie_word_embeddings:
        student.tie_weights()
    return student.eval() if not teacher.training else student

