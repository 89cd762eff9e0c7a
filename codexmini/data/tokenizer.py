"""A byte-level BPE trained with `tokenizers`, for runs that have no teacher tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ["<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a GPT-2 style byte-level BPE and wrap it as a transformers fast tokenizer (saves with the model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer_vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|unk|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", pad_token="<|pad|>")
