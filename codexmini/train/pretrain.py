"""A tiny random Llama teacher made on the fly, for smoke tests and notebooks: no download, seconds to build."""

from __future__ import annotations

import torch

from ..data import DataConfig, build_data, load_documents, split_documents, train_bpe_tokenizer
from .config import TrainerConfig
from .losses import next_token_loss
from .loop import fit


def tiny_random_teacher(data: DataConfig | dict | None = None, hidden_size: int = 64, num_hidden_layers: int = 4,
                        num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
                        vocab_size: int = 512, pretrain_steps: int = 0, seed: int = 0):
    """A tiny random Llama teacher with a byte-level BPE trained on the run's corpus.

    `pretrain_steps` > 0 trains it briefly with next-token cross-entropy through the shared trainer first, so
    that distilling from it means something. Returns (model, tokenizer) like `load_teacher`, the model frozen in
    eval mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    data = DataConfig(**data) if isinstance(data, dict) else (data or DataConfig(max_files=20))
    train_docs, _ = split_documents(load_documents(data), data)
    tokenizer = train_bpe_tokenizer(train_docs["text"], vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                      intermediate_size=intermediate_size, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if pretrain_steps:
        bundle = build_data(data.without_teacher(), tokenizer)
        trainer = TrainerConfig(max_steps=pretrain_steps, batch_size=8, lr=3e-3, warmup_steps=5,
                                eval_every=pretrain_steps, checkpoint_every=pretrain_steps, seed=seed,
                                log_with="none")
        model, _ = fit(model, next_token_loss, bundle.train, bundle.val, trainer, name="pretrain teacher")
    return model.eval().requires_grad_(False), tokenizer
