"""Exact and near-duplicate removal.

Exact duplicates are rows whose text is equal after lower-casing and collapsing whitespace. Near
duplicates are found with MinHash (Broder 1997) over word 5-gram shingles and locality-sensitive
hashing in bands (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3): two rows
whose signatures agree on a whole band are candidates, and a candidate is dropped when the
estimated Jaccard similarity of its shingles to an earlier kept row is at least the threshold.
The first row of each group is kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

SHINGLE_WORDS = 5
NUM_HASHES = 128
BANDS = 32  # 32 bands of 4 rows: pairs at Jaccard 0.8 become candidates with p = 1 - (1 - 0.8^4)^32
_PRIME = np.uint64((1 << 61) - 1)  # Mersenne prime; hashes are (a x + b) mod p


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_duplicates(texts: Sequence[str]) -> list[int]:
    """Indices of rows equal (after :func:`normalize`) to an earlier row."""
    seen: set[str] = set()
    dropped = []
    for i, text in enumerate(texts):
        key = normalize(text)
        if key in seen:
            dropped.append(i)
        seen.add(key)
    return dropped


def _shingles(text: str) -> np.ndarray:
    words = normalize(text).split(" ")
    n = SHINGLE_WORDS
    grams = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
    digests = [hashlib.blake2b(g.encode(), digest_size=4).digest() for g in grams]
    return np.array([int.from_bytes(d) for d in digests], dtype=np.uint64)


def _signatures(texts: Sequence[str], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # x < 2^32 and a < 2^31 keep a x + b below 2^64: exact in uint64 before the reduction.
    a = rng.integers(1, 1 << 31, NUM_HASHES, dtype=np.uint64)[:, None]
    b = rng.integers(0, 1 << 61, NUM_HASHES, dtype=np.uint64)[:, None]
    return np.stack([((a * _shingles(t)[None, :] + b) % _PRIME).min(axis=1) for t in texts])


def near_duplicates(texts: Sequence[str], threshold: float = 0.8, seed: int = 0) -> list[int]:
    """Indices of rows whose estimated shingle Jaccard similarity to an earlier kept row is at
    least ``threshold``."""
    if not texts:
        return []
    sig = _signatures(texts, seed)
    rows_per_band = NUM_HASHES // BANDS
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
    dropped = []
    for i in range(len(texts)):
        keys = [sig[i, k * rows_per_band : (k + 1) * rows_per_band].tobytes() for k in range(BANDS)]
        candidates = {j for k, key in enumerate(keys) for j in buckets[k].get(key, [])}
        if any(np.mean(sig[i] == sig[j]) >= threshold for j in candidates):
            dropped.append(i)
            continue
        for k, key in enumerate(keys):
            buckets[k].setdefault(key, []).append(i)
    return dropped
