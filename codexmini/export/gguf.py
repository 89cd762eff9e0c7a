"""Write a llama-architecture GGUF file (the format llama.cpp loads) from a Llama-shaped model.

Accepts a transformers Llama model or a CodexMini student whose layers are all softmax with uniform sizes.
Weights are written as F32 or F16; q/k rows are permuted into llama.cpp's rotary layout (transformers undoes this
permutation when it loads a GGUF, so a round trip gives back the same model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path

_TENSOR_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half layout -> llama.cpp's interleaved pairs, per head: rows (h, half, i) -> (h, i, half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def check_llama_shaped(model) -> dict:
    """What llama's GGUF needs of the model (raises ValueError saying what is missing); its rope theta and
    head size."""
    cfg = model.config
    if cfg.model_type == "codexmini":
        if getattr(cfg, "quantization_scheme", None):
            raise ValueError("GGUF export writes float weights; export the model before the quantize stage")
        if set(cfg.layer_types) != {"softmax"}:
            raise ValueError(f"GGUF export needs all-softmax layers; this model has {sorted(set(cfg.layer_types))}")
        for name in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"):
            if len(set(getattr(cfg, name))) != 1:
                raise ValueError(f"GGUF (llama) needs uniform layer sizes; {name} = {getattr(cfg, name)}")
        if cfg.embedding_rank:
            raise ValueError("GGUF (llama) has no factored embeddings; export a model with embedding_rank=null")
        theta = cfg.rope_theta
    elif cfg.model_type == "llama":
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    else:
        raise ValueError(f"GGUF export supports llama and codexmini models, not {cfg.model_type!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("GGUF (llama) export does not support bias terms")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return dict(theta=float(theta), head_dim=head_dim)


def write_llama_gguf(model, tokenizer, path: str | Path, dtype: str = "f32", name: str = "codexmini") -> Path:
    """Write `model` (+ its fast tokenizer) to `path` as a llama GGUF; atomically (temp file + rename)."""
    import gguf

    info = check_llama_shaped(model)
    cfg = model.config
    if dtype not in ("f32", "f16"):
        raise ValueError(f"GGUF dtype {dtype!r} must be 'f32' or 'f16'")
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(info["head_dim"])
        w.add_key_length(info["head_dim"])
        w.add_value_length(info["head_dim"])
        w.add_rope_freq_base(info["theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        _add_tokenizer(w, tokenizer, cfg)
        np_dtype = np.float32 if dtype == "f32" else np.float16
        sd = model.state_dict()
        tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
        if not cfg.tie_word_embeddings:
            tensors["output.weight"] = sd["lm_head.weight"]
        for i in range(cfg.num_hidden_layers):
            for hf, gg in _TENSOR_NAMES.items():
                t = sd[f"model.layers.{i}.{hf}"]
                if hf.startswith("self_attn.q_proj"):
                    t = _rope_permute(t, cfg.num_attention_heads)
                elif hf.startswith("self_attn.k_proj"):
                    t = _rope_permute(t, cfg.num_key_value_heads)
                tensors[f"blk.{i}.{gg}"] = t
        for key, t in tensors.items():
            # Norm weights stay f32 (llama.cpp expects it); matrices take the chosen dtype.
            arr = t.detach().float().cpu().numpy()
            w.add_tensor(key, arr if arr.ndim == 1 else arr.astype(np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _add_tokenizer(w, tokenizer, cfg) -> None:
    """GPT-2 style byte-level BPE vocabulary, merges and special ids: tokenizer model 'gpt2', pre-tokenizer 'gpt-2'
    (the GPT-2 split regex, which is what a `ByteLevel(use_regex=True)` pre-tokenizer applies; llama.cpp refuses
    unknown pre-tokenizer names when it loads the file)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers, not {spec['model']['type']}")
    vocab = spec["model"]["vocab"]
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    size = cfg.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED for ids the tokenizer does not define (a padded vocabulary)
    for tok, idx in vocab.items():
        if idx < size:
            tokens[idx] = tok
            types[idx] = 3 if idx in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, value in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                          (w.add_pad_token_id, tokenizer.pad_token_id), (w.add_unk_token_id, tokenizer.unk_token_id)):
        if value is not None:
            setter(int(value))
    w.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
