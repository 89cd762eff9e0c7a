"""The CodexMini student: Llama-style decoder blocks whose attention is softmax, linear or hybrid per layer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..ops.norm import rms_norm
from ..ops.rope import rotary_cos_sin
from .attention import ATTENTION_CLASSES, LinearAttention, initial_decay_logits
from .cache import CodexMiniCache
from .configuration import CodexMiniConfig
from .feature_maps import HedgehogFeatureMap
from .quantized import install_quant_linears


class CodexMiniRMSNorm(nn.Module):
    """RMSNorm with its learnable weight `[hidden]` (the function is `codexmini.ops.norm.rms_norm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


class CodexMiniMLP(nn.Module):
    def __init__(self, config: CodexMiniConfig, intermediate_size: int):
        super().__init__()
        d, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CodexMiniDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CodexMiniConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = CodexMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ATTENTION_CLASSES[self.layer_type](config, layer_idx)
        self.post_attention_layernorm = CodexMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CodexMiniMLP(config, config.layer_intermediate_sizes[layer_idx])

    def forward(self, hidden_states, cos, sin, attention_mask=None, cache=None):
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, attention_mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class FactoredEmbedding(nn.Module):
    """ALBERT-style embedding: `vocab x rank` lookup then a `rank -> hidden` projection."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, rank)
        self.proj = nn.Linear(rank, hidden_size, bias=False)

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))

    def unembed(self, hidden):
        """Tied output head through the same factors: `hidden -> rank -> vocab`."""
        return F.linear(F.linear(hidden, self.proj.weight.t()), self.embed.weight)


class CodexMiniPreTrainedModel(PreTrainedModel):
    config_class = CodexMiniConfig
    config: CodexMiniConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CodexMiniDecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Linear layers keep a recurrent state, not keys/values: the model makes its own CodexMiniCache.
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        # transformers' init helpers skip tensors already loaded from a checkpoint.
        if isinstance(module, HedgehogFeatureMap):
            init.copy_(module.weight, module.identity_weight())
        elif isinstance(module, LinearAttention) and module.decay_logit is not None:
            init.copy_(module.decay_logit, initial_decay_logits(module.num_heads))


class CodexMiniModel(CodexMiniPreTrainedModel):
    def __init__(self, config: CodexMiniConfig):
        super().__init__(config)
        if config.embedding_rank:
            self.embed_tokens = FactoredEmbedding(config.vocab_size, config.embedding_rank, config.hidden_size)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(CodexMiniDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = CodexMiniRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recompute in backward would update the cache a second time
        if use_cache and cache is None:
            cache = CodexMiniCache(self.config.num_hidden_layers)
        if not use_cache:
            cache = None
        B, T = inputs_embeds.shape[:2]
        past = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2D [batch, past + new tokens], got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: positions count real tokens only, as Llama's generate does.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        h = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(h)
            h = layer(h, cos, sin, attention_mask, cache)
        h = self.norm(h)
        if all_hidden is not None:
            all_hidden.append(h)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=h, cache=cache,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class CodexMiniForCausalLM(CodexMiniPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CodexMiniConfig):
        # A factored, tied head reuses the embedding factors in forward, and a quantized tied table is its own head
        # (`QuantEmbedding.unembed`): there is no lm_head to tie in either case.
        no_head = config.tie_word_embeddings and (
            config.embedding_rank or "model.embed_tokens" in (config.quantization_scheme or {}))
        if config.embedding_rank or no_head:
            self._tied_weights_keys = {}
        super().__init__(config)
        self.model = CodexMiniModel(config)
        if no_head:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.quantization_scheme:
            install_quant_linears(self, config.quantization_scheme)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.unembed(hidden)
        return self.lm_head(hidden)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=None, skip_logits=False,
                **kwargs):
        """Returns logits `[B, T, vocab]` (or the last `logits_to_keep`), the loss if `labels` is given
        (next-token cross-entropy, -100 ignored), and the cache.

        `skip_logits=True` returns no logits, only the hidden states (last one = final norm output): the
        distillation loss turns them into logits a chunk at a time through `self.logits`.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        if skip_logits:
            hidden = out.hidden_states if out.hidden_states is not None else (h,)
            return CausalLMOutputWithPast(logits=None, cache=out.cache, hidden_states=hidden)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
