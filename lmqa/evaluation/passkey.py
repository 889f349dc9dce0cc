"""The paper's passkey retrieval test (method page, section 5)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lmqa.qa.prompts import template


@dataclass
class PasskeyCase:
    prompt: str
    key: int
    ids: list[int]  # the prompt's token ids: tokenizing a 1M-token prompt takes seconds, so do it once
    depth: float

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def make_case(tokenizer, length: int, rng: random.Random, depth: float | None = None) -> PasskeyCase:
    """A prompt of about `length` tokens with the key at relative depth `depth` (random if None)."""
    body, filler = template("passkey"), template("passkey_filler")
    key = rng.randint(1, 50000)
    depth = rng.random() if depth is None else depth
    fixed = len(tokenizer(body.format(prefix="", suffix="", key=key)).input_ids)
    per_filler = len(tokenizer(" ".join([filler] * 20)).input_ids) / 20
    n_filler = max(0, round((length - fixed) / per_filler))
    n_prefix = round(n_filler * depth)
    prompt = body.format(prefix=" ".join([filler] * n_prefix), suffix=" ".join([filler] * (n_filler - n_prefix)), key=key)
    return PasskeyCase(prompt, key, tokenizer(prompt).input_ids, depth)


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None
