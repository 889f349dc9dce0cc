"""Size a document before loading a model for it.

The key/value cache, not the weights, is what grows with a whole book or
codebase, so the useful early question is how many tokens and how many bytes
of cache the document will take.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .document import Document


class Estimate(NamedTuple):
    tokens: int
    kv_bytes: int


def estimate(document: Document, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2,
             tokenizer=None, chars_per_token: float = 4.0) -> Estimate:
    """tokenizer: count exactly (one tokenization pass, seconds for a large
    codebase); without it, len(text) / chars_per_token (instant; about 4 for
    English prose, nearer 3 for code). kv_bytes counts a key and a value per
    token, layer and key/value head."""
    if tokenizer is not None:
        tokens = len(tokenizer(document.text, add_special_tokens=False)["input_ids"])
    else:
        tokens = math.ceil(len(document.text) / chars_per_token)
    return Estimate(tokens, kv_cache_bytes(tokens, layers, kv_heads, head_dim, dtype_bytes))


def kv_cache_bytes(positions: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """A key and a value per position, layer and key/value head; shared with
    callers that already hold exact token counts, so there is one formula."""
    return positions * layers * 2 * kv_heads * head_dim * dtype_bytes
