"""Evidence for an answer: the document passages its tokens attended to most.

A generated sentence from a small model can be wrong while the blocks it read
are right, so every answer comes with where it looked. While answer tokens
are generated, the engine hands each layer's attention probabilities over the
slots of the retrieved blocks and of the open block (the grouped softmax's
outer probability of a block times the inner one of its token) to an
EvidenceRecorder, which sums them per token over layers, query heads and
answer tokens. passages() sums those over each block's document tokens (the
prompt's head, the question and earlier turns are no evidence; the attention
sink at the prompt's start would otherwise win every time), ranks the blocks,
merges neighbouring top blocks and maps them to file:line and text through
the session's source map. Per token, not per block: the document's last
block is shared with the question, and a fact written there (or still in
the open block while the answer is generated) is evidence too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from lmqa.ingest import BlockSource, Document

PASSAGES = 3  # at most this many passages per answer
RUN = 3  # neighbouring blocks merged into one passage, at most


class SessionLayout(Protocol):
    """What evidence reads of a session (qa/session.py's DocumentSession),
    written out here because the session imports this module: its document
    and how its tokens lie on it (token ids, block size, where the
    document's tokens begin, and each document block's source)."""

    document: Document
    doc_token_start: int
    sources: Mapping[int, BlockSource]

    @property
    def token_ids(self) -> list[int]: ...

    @property
    def block_size(self) -> int: ...


@dataclass(frozen=True)
class TokenMass:
    """Attention mass per ordinary token (float64, [n]: block i holds tokens
    i*b .. i*b+b-1), summed over `rows` query rows (layers x query heads x
    answer tokens); mass / rows is a token's mean share of the answer's attention.
    quoted: the document's characters [start, end) that a quoting answer
    repeats, one span per quote (a list answer has several); their blocks
    lead the evidence (see passages())."""

    mass: torch.Tensor
    rows: int
    quoted: tuple[tuple[int, int], ...] = ()


class EvidenceRecorder:
    """Accumulates per-token attention mass; the engine calls add() once per
    layer in every step while it records into it (LandmarkEngine.record_evidence:
    the session records the question's tokens into one, the answer's into another).
    The sums stay on the engine's device until result(), so recording costs
    no host synchronisation per layer."""

    def __init__(self):
        self._mass: torch.Tensor | None = None
        self._rows = 0

    def add(self, block_ids: torch.Tensor, probs: torch.Tensor) -> None:
        """block_ids: [Hkv, n] blocks read (retrieved, and the open one);
        probs: [Hkv, rows, n, b+1] the attention probability of each of their
        slots for each query row of the head group (the landmark slot, last,
        carries no value and is not a token)."""
        b = probs.shape[-1] - 1
        tokens = (block_ids[:, :, None] * b + torch.arange(b, device=block_ids.device)).flatten()  # [Hkv * n * b]
        need = int(tokens.max()) + 1
        if self._mass is None or len(self._mass) < need:
            grown = torch.zeros(max(need, 2 * (0 if self._mass is None else len(self._mass))),
                                dtype=torch.float64, device=probs.device)
            if self._mass is not None:
                grown[: len(self._mass)] = self._mass
            self._mass = grown
        self._mass.index_add_(0, tokens, probs[..., :b].sum(dim=1).flatten().to(torch.float64))
        self._rows += probs.shape[0] * probs.shape[1]

    def result(self) -> TokenMass:
        mass = torch.zeros(0, dtype=torch.float64) if self._mass is None else self._mass.cpu()
        return TokenMass(mass, self._rows)


@dataclass(frozen=True)
class Passage:
    """Consecutive document blocks in one file, chapter or page, with the
    attention mass the answer put on them."""

    blocks: tuple[int, ...]
    top_block: int  # the passage's block with the most mass
    file: str
    start_line: int
    end_line: int
    mass: float  # summed over layers, query heads and answer tokens
    share: float  # mass per query row: the mean share of the answer's attention
    text: str
    quoted: bool = False  # the answer repeats this passage's text (it leads whatever its mass)

    @property
    def location(self) -> str:
        lines = str(self.start_line) if self.start_line == self.end_line else f"{self.start_line}-{self.end_line}"
        return f"{self.file}:{lines}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "start_line": self.start_line, "end_line": self.end_line, "block": self.top_block,
                "blocks": list(self.blocks), "mass": round(self.mass, 6), "share": round(self.share, 6),
                "quoted": self.quoted, "text": self.text}


def document_mass(session: SessionLayout, evidence: TokenMass) -> torch.Tensor:
    """Per block, the evidence mass of its document tokens (the prompt's head
    comes before them; the question and answers after): [n_blocks], float64."""
    b, start, end = session.block_size, session.doc_token_start, len(session.token_ids)
    mass = evidence.mass.clone()
    mass[:start] = 0
    mass[end:] = 0
    return torch.nn.functional.pad(mass, (0, -len(mass) % b)).view(-1, b).sum(dim=1)


def passages(session: SessionLayout, evidence: TokenMass | None, limit: int = PASSAGES) -> list[Passage]:
    """Up to `limit` passages (at least one per quote): the passages an answer
    quotes first, then most mass first. Attention mass alone favours the blocks nearest the question
    (the book's last lines) and easy text, so a quote's own place in the
    document is the first evidence whatever its mass. Blocks are taken in that
    order: a block next to a passage in the same file joins it (up to RUN
    blocks), a block next to a full passage is passed over, any other starts a
    new one, so a run of neighbours shows as one passage and the rest go elsewhere."""
    if evidence is None or not evidence.rows:
        return []
    mass = document_mass(session, evidence)
    runs: list[list[int]] = []
    for span in evidence.quoted:
        run = [b for b in _blocks_of(session, *span)[:RUN] if not any(b in r for r in runs)]
        if run:
            runs.append(run)
    quoted, limit = {b for r in runs for b in r}, max(limit, len(runs))
    mass = torch.nn.functional.pad(mass, (0, max(quoted, default=-1) + 1 - len(mass))) if quoted else mass
    leading = len(runs)
    for block in mass.argsort(descending=True, stable=True).tolist():
        if mass[block] <= 0:
            break
        if block in quoted:
            continue
        near = [r for r in runs if block in (r[0] - 1, r[-1] + 1) and _same_part(session, block, r[0])]
        if near:
            if len(near[0]) < RUN:
                near[0].append(block)
                near[0].sort()
        elif len(runs) < limit:
            runs.append([block])
        else:
            break
    found = [_passage(session, run, mass, evidence.rows, i < leading) for i, run in enumerate(runs)]
    return found[:leading] + sorted(found[leading:], key=lambda p: (-p.mass, p.blocks[0]))


def holds(session: SessionLayout, found: list[Passage], start: int, end: int) -> bool:
    """Does one of the passages `found` hold a block with any of the
    document's characters [start, end) (a planted fact, in evaluation)?"""
    return any(set(_blocks_of(session, start, end)) & set(p.blocks) for p in found)


def quoted_span(session: SessionLayout, answer: str, evidence: TokenMass | None = None) -> tuple[int, int] | None:
    """Where in the document the answer's text occurs (whitespace matching any
    whitespace, as quotes are held); of several places, the one whose blocks
    the answer attended to most (the first without evidence). None when it
    is not a passage of the document."""
    words = answer.split()
    if not words:
        return None
    pattern = re.compile(r"\s+".join(map(re.escape, words)))
    spans = [m.span() for m in pattern.finditer(session.document.text)]
    if len(spans) > 1 and evidence is not None:
        mass = document_mass(session, evidence)
        return max(spans, key=lambda s: sum(float(mass[b]) for b in _blocks_of(session, *s) if b < len(mass)))
    return spans[0] if spans else None


def _blocks_of(session: SessionLayout, start: int, end: int) -> list[int]:
    """The document blocks holding any of the characters [start, end), in order."""
    return sorted(b for b, s in session.sources.items() if s.char_start < end and s.char_end > start)


def _same_part(session: SessionLayout, left: int, right: int) -> bool:
    """Both blocks lie wholly in one and the same file, chapter or page, so
    the merged passage has one file:line range."""
    a, b = session.sources[left].locations, session.sources[right].locations
    return len(a) == len(b) == 1 and a[0].title == b[0].title


def _passage(session: SessionLayout, run: list[int], mass: torch.Tensor, rows: int, quoted: bool) -> Passage:
    first, last = session.sources[run[0]], session.sources[run[-1]]
    masses = [float(mass[b]) for b in run]
    text = session.document.text[first.char_start : last.char_end].strip()
    return Passage(tuple(run), run[masses.index(max(masses))], first.title, first.line_start, last.line_end, sum(masses),
                   sum(masses) / rows, text, quoted)


def excerpt(text: str, width: int = 320) -> str:
    """One line of at most `width` characters, cut at a word, for display."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    cut = flat.rfind(" ", 0, width)
    return flat[: cut if cut > width // 2 else width].rstrip(",;:") + " …"
