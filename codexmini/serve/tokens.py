"""Token ids to text for a server: incremental detokenization with stop strings, and each token's text and bytes
for `logprobs`.

`TextStream` gives the same text as `codexmini.runtime.sampling.stream_text` (which decodes every token so far at
each step), but decodes only a window of the last few tokens per step, so a long completion costs O(n), not
O(n^2): vLLM's prefix/read offsets. Text is held back while it could still be the start of a stop string or ends
in an incomplete UTF-8 character.
"""

from __future__ import annotations

import json
from functools import lru_cache


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """Each token's text (as decoding it alone gives) and its raw bytes (what OpenAI's `bytes` field holds: a token
    may be part of a UTF-8 character, so its text alone can be lossy)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = (json.loads(tokenizer.to_str()).get("decoder") or {})
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.lookup = lru_cache(maxsize=65536)(self._lookup)

    def _lookup(self, tok: int) -> tuple[str, bytes]:
        text = self.tokenizer.decode([tok], skip_special_tokens=False)
        piece = self.tokenizer.id_to_token(tok) or ""
        if self.byte_level and all(c in _BYTE_OF for c in piece):
            return text, bytes(_BYTE_OF[c] for c in piece)
        if self.byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return text, bytes([int(piece[3:5], 16)])
        return text, text.encode("utf-8")


class TextStream:
    """The text of a completion, token by token, ending at the first stop string (which is not part of it)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # characters of `text` handed out
        self._prefix = self._read = 0  # the decode window: ids[_prefix:_read] are already in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)

    def _take(self, final: bool) -> tuple[str, bool]:
        # A stop string starts at or after `emitted`: everything before it was checked with `hold` characters
        # of look-ahead.
        found = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if found:
            cut = min(found)
            out, self.emitted = self.text[self.emitted:cut], cut
            return out, True
        safe = len(self.text) if final or not self.stop else len(self.text) - self.hold
        if safe <= self.emitted:
            return "", False
        out, self.emitted = self.text[self.emitted:safe], safe
        return out, False

    def push(self, tok: int) -> tuple[str, bool]:
        """Add a generated token: (the text that is now final, whether a stop string ended the completion)."""
        self.ids.append(tok)
        self._advance(False)
        return self._take(False)

    def flush(self) -> tuple[str, bool]:
        """At the end of the completion: the text still held back (and whether it held a stop string)."""
        self._advance(True)
        return self._take(True)
