"""Answers that quote the document: a logits processor for generate().

The shipped model answers a question with the sentence of the document that
holds the fact (that is how lmqa trains it, see lmqa/train/qa_data.py). A
135M model often finds the right sentence and then drifts while copying it
("a shade of green" where the book says "a shade she called thunderstorm
teal"). QuoteConstraint lets only tokens through that keep the answer a
verbatim passage of the document (with single spaces where the document
has any whitespace: hard-wrapped lines and no-break spaces show as spaces;
and a capital where a quote starts a word the document writes in lower
case), or a prefix of
one of a few fixed answers such as "The document does not say.". The model
still chooses where to quote from and when to stop; it can no longer invent.
"""

from __future__ import annotations

import re

import torch

from lmqa.engine.generation import keep_only

_SPACE = re.compile(r"\s+")
_SPACE_RUN = re.compile(r"\s\s")
_NOT_A_SPACE = re.compile(r"[^\S ]")  # whitespace other than " ": a line break, a tab, a no-break space


def normalize(text: str) -> str:
    """Every run of whitespace one space: a quote may break lines elsewhere."""
    return _SPACE.sub(" ", text)


def _pattern(answer: str) -> re.Pattern:
    """Where answer occurs, as a zero-width match; an answer that starts with
    a capital may also start at a word the document writes in lower case (a
    quote taken from mid-sentence)."""
    first, rest = answer[0], re.escape(answer[1:])
    lower = f"|(?<!\\w){re.escape(first.lower())}" if first.lower() != first else ""
    return re.compile(f"(?=(?:{re.escape(first)}{lower}){rest})")


class QuoteConstraint:
    """Among the `candidates` likeliest next tokens (64 times as many when
    none of them fits), keeps those whose answer
    text still occurs in the document (or starts one of `fixed`); every
    other token gets -inf. A token that adds whitespace where the answer
    already ends in it is not allowed either (it would match, as the
    document's whitespace is normalised, and show as "the  violinist"), nor
    one with whitespace other than a space ("cook,\nMatilda."). Stop
    tokens are allowed where the answer ends a word of the document (not
    "in a" of "in an empty box") or is a whole fixed answer; inside a word,
    the token that continues the document's text is always allowed; when
    nothing else fits, stopping is always allowed (and with no stop tokens, or
    before any text, the logits then pass unchanged).

    Matching is incremental: the offsets where the answer so far occurs are
    kept, so a step costs one comparison per (candidate, offset)."""

    def __init__(self, tokenizer, quotable: str, fixed: tuple[str, ...] = (), stop_ids: set[int] = frozenset(),
                 candidates: int = 64):
        """quotable: the document's text, normalize()d (a session keeps it)."""
        self.tokenizer = tokenizer
        self.text = quotable
        self.fixed = tuple(normalize(f) for f in fixed)
        self.stop_ids = set(stop_ids)
        self.special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.candidates = candidates
        self._answer = ""  # normalized answer text of the tokens seen so far
        self._raw = ""  # and as decoded
        self._seen: list[int] = []
        self._offsets: list[int] | None = None  # where _answer occurs in the document (None: not yet searched)

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        self._advance(generated)
        allowed = []
        for n in (self.candidates, 64 * self.candidates):  # the likeliest first; wider only when none fits
            allowed = [t for t in logits.topk(min(n, logits.numel())).indices.tolist() if self._fits(t)]
            if allowed or n >= logits.numel():
                break
        word_end = bool(self._answer) and self._ends_a_word()
        if self._answer and not word_end:
            allowed += [t for t in self._word_rest() if t < logits.numel() and t not in allowed]
        if self._answer and (not allowed or word_end):
            allowed += [t for t in self.stop_ids if t < logits.numel()]
        return keep_only(logits, allowed) if allowed else logits

    # ----- matching -----
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _text(raw: str) -> tuple[str, int]:
        """The normalized answer text of a decoded answer, without leading
        space, and the count of replacement characters it ends in: bytes of a
        character that a token boundary cut (at most 3 of a 4-byte UTF-8
        character)."""
        text = normalize(raw).lstrip()
        whole = text.rstrip("\ufffd")
        return whole, len(text) - len(whole)

    def _advance(self, generated: list[int]) -> None:
        if generated == self._seen:
            return
        if generated[: len(self._seen)] != self._seen:  # a new answer: start over
            self._seen, self._answer, self._raw, self._offsets = [], "", "", None
        self._seen = list(generated)
        self._raw = self._decode(generated)
        answer, _ = self._text(self._raw)
        if answer != self._answer:
            self._offsets = self._occurrences(answer)
            self._answer = answer

    def _occurrences(self, answer: str) -> list[int]:
        if not answer:
            return []
        if self._offsets is None or not answer.startswith(self._answer):
            return [m.start() for m in _pattern(answer).finditer(self.text)]
        return [p for p in self._offsets if self.text.startswith(answer[1:], p + 1)]

    def _fits(self, token: int) -> bool:
        if token in self.stop_ids or token in self.special:
            return False  # stopping is decided in __call__; other special tokens are no text
        raw = self._decode(self._seen + [token])
        added = raw[len(self._raw):] if raw.startswith(self._raw) else raw
        if _SPACE_RUN.search(self._raw[-1:] + added) or _NOT_A_SPACE.search(added):
            return False  # whitespace after whitespace; a quote's whitespace is one space
        answer, cut = self._text(raw)
        if cut > 3:
            return False
        if cut:  # part of a character: the document must have one that is not ASCII next
            return self._continues(answer, lambda c: not c.isascii())
        if not answer:
            return True  # leading whitespace: decided by the next token
        if answer == self._answer:
            return False  # a token with no text
        return any(f.startswith(answer) for f in self.fixed) or self._continues(answer)

    def _ends_a_word(self) -> bool:
        """Does the answer so far end where a word of the document (or a
        fixed answer) ends?"""
        answer = self._answer.rstrip()
        if any(f.rstrip() == answer for f in self.fixed):
            return True
        end = len(answer)
        return any(p + end >= len(self.text) or not self.text[p + end].isalnum() for p in self._offsets or ())

    def _word_rest(self, at_most: int = 8) -> list[int]:
        """First tokens of the document's text where the answer stops inside
        a word ("in a" of "in an empty box"): the tokenizer may cut the
        word where no likely token does, and the quote must be able to end it."""
        firsts = []
        for p in (self._offsets or [])[:at_most]:
            rest = self.text[p + len(self._answer): p + len(self._answer) + 24]
            ids = self.tokenizer(rest, add_special_tokens=False).input_ids if rest else []
            if ids and ids[0] not in firsts and self._fits(ids[0]):
                firsts.append(ids[0])
        return firsts

    def _continues(self, answer: str, next_char=None) -> bool:
        """Does answer occur in the document (with next_char(c) true of the
        character after it)?"""
        if not answer:  # half a character to start with
            return next_char is None or any(not c.isascii() for c in self.text)
        if not self._answer:
            if next_char is None:
                return _pattern(answer).search(self.text) is not None
        elif not answer.startswith(self._answer):
            return False
        end = len(answer)
        return any(next_char is None or (p + end < len(self.text) and next_char(self.text[p + end]))
                   for p in self._occurrences(answer))
