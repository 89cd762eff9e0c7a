"""Near-duplicate documents, found so that a train / held-out split never puts two copies of one text on both sides.

Machine text repeats itself: manual pages of one tool family share whole sections, licence files are the same
licence with another name on top, package READMEs copy each other. Split by document alone, the held-out part of
such a domain is largely text the student trained on, and its perplexity measures memory instead of breadth (in
the quickstart's mixture, 45% of the man pages' held-out 16-token spans were also in the training blocks; with
this split, none are).

Documents are compared by word shingles (`SHINGLE_WORDS` consecutive words). A sample of them, picked by hash so
that every document samples the same shingles, is indexed; two documents are near-duplicates when they share at
least `MIN_SHARED` of the smaller one's sampled shingles, and near-duplicates are grouped transitively
(union-find). A split then keeps each group on one side.
"""

from __future__ import annotations

import zlib
from collections import Counter

SHINGLE_WORDS = 8
# of the smaller document's sampled shingles; at 0.3, 14% of the man pages' held-out spans still leaked
MIN_SHARED = 0.1
SAMPLE_EVERY = 4  # keep the shingles whose hash is 0 mod this: the same ones in every document
MAX_INDEXED = 4_000_000  # about this many sampled shingles at most: a bigger corpus samples more sparsely


def _shingles(text: str, every: int = SAMPLE_EVERY) -> set[int]:
    """The sampled shingle hashes of one document (crc32 of the words: the same in every process)."""
    words = [zlib.crc32(w.encode("utf-8", "replace")) for w in text.split()]
    if len(words) < SHINGLE_WORDS:
        return {zlib.crc32(str(words).encode())} if words else set()
    out = set()
    for i in range(len(words) - SHINGLE_WORDS + 1):
        h = hash(tuple(words[i:i + SHINGLE_WORDS]))  # ints hash the same in every process
        if h % every == 0:
            out.add(h)
    return out


def near_duplicate_groups(texts: list[str], min_shared: float = MIN_SHARED) -> list[int]:
    """A group id for every text (0, 1, ... in order of first appearance): texts that share at least `min_shared`
    of the smaller one's sampled shingles get the same id, transitively."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    words = sum(len(t) for t in texts) // 6  # about six characters a word
    every = max(SAMPLE_EVERY, -(-words // MAX_INDEXED))
    owner: dict[int, int] = {}  # shingle -> the first document that had it
    sizes = []
    for i, text in enumerate(texts):
        sh = _shingles(text, every)
        sizes.append(len(sh))
        shared = Counter(owner[h] for h in sh if h in owner)
        for j, n in shared.items():
            if n >= min_shared * max(1, min(len(sh), sizes[j])):
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        for h in sh:
            owner.setdefault(h, i)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(len(texts))]
