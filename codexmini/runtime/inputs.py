"""What the runtime is given, checked before it is used: prompts (text and token ids) and the tokenizer a `.cmx`
file carries. Each check raises one clear error (`ValueError`, `TypeError`, or `CmxError` for the file) instead of
letting a library fail later with its own message, or worse, run on a silently changed input: float token ids
truncated to ints, a prompt past the model's positions, a surrogate character the tokenizer cannot encode.
"""

from __future__ import annotations

import numbers

import torch

from ..cmx import CmxError

# Integer dtypes a tensor of token ids may have (bool and floats are refused: they would be silently converted).
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_prompt_text(prompt) -> str:
    """The prompt as text: a `str` (of valid Unicode: no lone surrogates, which cannot be encoded) or `bytes` of
    valid UTF-8 (decoded). Anything else is refused with the type it was."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        data = bytes(prompt)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"the prompt is not valid UTF-8: byte {err.start} ({data[err.start:err.start + 1]!r}) "
                             f"cannot start or continue a character ({err.reason})") from None
    if not isinstance(prompt, str):
        raise TypeError(f"the prompt must be a string (or UTF-8 bytes), got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the prompt holds a character that is not valid Unicode text at position {err.start} "
                         f"({prompt[err.start]!r}: {err.reason}); was it read with errors='surrogateescape'?") \
            from None
    return prompt


def check_token_ids(ids, vocab_size: int) -> torch.Tensor:
    """Token ids as a 1-D int64 tensor, refusing what `torch.as_tensor(ids, dtype=torch.long)` would silently
    change or what would index outside the embedding table: floats (even 3.0), bools, other objects, ids < 0 or
    >= `vocab_size`, an empty sequence.

    Args:
        ids: a list / tuple of ints (numpy integers too), or an integer tensor / array of any shape (flattened).
        vocab_size: rows of the model's embedding table.
    """
    if not isinstance(ids, (torch.Tensor, list, tuple)) and hasattr(ids, "__array__"):
        try:
            ids = torch.as_tensor(ids)  # a numpy array: its dtype is checked as a tensor's below
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"token ids must be integers, got an array of {getattr(ids, 'dtype', '?')}") from None
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in _INT_DTYPES:
            raise TypeError(f"token ids must be integers, got a tensor of {ids.dtype}")
        t = ids.reshape(-1).to(torch.long)
    else:
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"token ids must be a list of ints or an integer tensor, got {type(ids).__name__}")
        for i, x in enumerate(ids):
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise TypeError(f"token ids must be integers: ids[{i}] = {x!r} is a {type(x).__name__}")
        t = torch.tensor([int(x) for x in ids], dtype=torch.long)
    if t.numel() == 0:
        raise ValueError("no token ids to run")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{vocab_size - 1})")
    return t


def check_prompt_length(n_tokens: int, max_positions: int | None, start: int = 0, window: bool = False) -> int:
    """How many of a prompt's `n_tokens` to run after `start` tokens a session already holds, for a model with
    `max_positions` positions (None: no limit known).

    A prompt past the limit is refused with the numbers and what to do, unless `window` is set: then only its
    last tokens that fit are run (the caller keeps `ids[-returned:]`). Returns `n_tokens` when it fits.
    """
    if max_positions is None or start + n_tokens <= max_positions:
        return n_tokens
    room = max_positions - start
    if window and room > 0:
        return room
    held = f" after the {start} tokens the session holds" if start else ""
    raise ValueError(f"the prompt is {n_tokens} tokens{held}, but the model has {max_positions} positions "
                     "(max_position_embeddings); shorten it, or ask for it to be windowed to its last tokens "
                     "(SamplingConfig(window_prompt=True), --window-prompt)")


def max_positions(config: dict) -> int | None:
    """The positions a model was made for (`max_position_embeddings` in its config), None where not recorded."""
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_tokenizer(tokenizer_json: str, path=None):
    """The `tokenizers.Tokenizer` a `.cmx` file carries, or `CmxError` naming the file when its tokenizer.json
    does not parse (the reader checks its outline; the tokenizers library checks the rest)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as err:  # noqa: BLE001 - tokenizers raises a plain Exception for a bad tokenizer.json
        where = f"{path}: " if path is not None else ""
        raise CmxError(f"{where}metadata 'tokenizer' is not a tokenizer.json the tokenizers library can load "
                       f"({err}); export the model again") from None
