"""Layers x blocks heatmap of one answer's retrievals, with the document's
chapters or files marked along the block axis, so one look shows which
parts of a book or codebase each layer went back to."""

from __future__ import annotations

import re
from bisect import bisect_right
from pathlib import Path

import numpy as np

from lmqa.atomic_file import atomic_path
from .session import Answer, DocumentSession

MAX_COLUMNS = 1200  # wider documents are binned so a lone retrieval stays visible
MAX_LABELS = 40
# Chapter headings of plain-text books ("CHAPTER 12.", "Letter 3", "ADVENTURE IV."):
# a single-file novel has no segments, but its headings are its structure.
_HEADING = re.compile(r"^[ \t]*(chapter|letter|book|part|volume|stave|adventure)[ \t]+([0-9]+|[ivxlcdm]+)\b[^\n]*$",
                      re.IGNORECASE | re.MULTILINE)


def structure_marks(session: DocumentSession) -> list[tuple[int, str]]:
    """(first block, label) of each file, chapter or page; for a one-segment
    document, of each chapter heading (the last occurrence of a heading wins,
    so a table of contents does not crowd the start)."""
    doc = session.document
    if len(doc.segments) > 1:
        starts = [(s.char_start, s.title) for s in doc.segments]
    else:
        last: dict[str, tuple[int, str]] = {}
        for m in _HEADING.finditer(doc.text):
            last[f"{m.group(1)} {m.group(2)}".lower()] = (m.start(), " ".join(m.group(0).split())[:40])
        starts = sorted(last.values())
    sources = sorted(session.sources.values(), key=lambda s: s.char_start)
    if not sources:
        return []
    block_starts = [s.char_start for s in sources]
    return [(sources[max(bisect_right(block_starts, pos) - 1, 0)].block, label) for pos, label in starts]


def retrieval_counts(answer: Answer, n_blocks: int) -> np.ndarray:
    """[layers, n_blocks] times each block was retrieved, over heads and steps."""
    counts = np.zeros((answer.n_layers, n_blocks), dtype=np.int64)
    for step in answer.steps:
        ids = step.block_ids.numpy()  # [layers, Hkv, r]
        layers = np.broadcast_to(np.arange(ids.shape[0])[:, None, None], ids.shape)
        np.add.at(counts, (layers.ravel(), ids.ravel()), 1)
    return counts


def plot(session: DocumentSession, answer: Answer, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    used = max((int(s.block_ids.max()) for s in answer.steps if s.block_ids.numel()), default=-1)
    n_blocks = max(max(session.sources, default=-1), used) + 1
    counts = retrieval_counts(answer, max(n_blocks, 1))
    per_col = -(-counts.shape[1] // MAX_COLUMNS)
    if per_col > 1:  # sum whole bins so the x axis still reads in block ids
        pad = (-counts.shape[1]) % per_col
        counts = np.pad(counts, ((0, 0), (0, pad))).reshape(counts.shape[0], -1, per_col).sum(axis=2)

    fig, ax = plt.subplots(figsize=(14, 2.5 + 0.18 * max(answer.n_layers, 1)), constrained_layout=True)
    shown = np.ma.masked_equal(counts, 0)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=LogNorm(vmin=1, vmax=max(int(counts.max()), 2)),
                      extent=(0, counts.shape[1] * per_col, answer.n_layers - 0.5, -0.5))
    ax.set_facecolor("#f4f4f4")
    ax.set_xlabel(f"block (of {session.block_size} tokens)" + (f", {per_col} blocks per column" if per_col > 1 else ""))
    ax.set_ylabel("layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, pad=0.01, label="retrievals (heads x steps)")
    marks = structure_marks(session)
    if session.sources:  # blocks after the document hold the question
        marks.append((max(session.sources) + 1, "(question)"))
    for block, _ in marks:
        ax.axvline(block, color="#d62728", linewidth=0.6, alpha=0.6)
    if marks:
        every = -(-len(marks) // MAX_LABELS)
        top = ax.secondary_xaxis("top")
        top.set_xticks([b for b, _ in marks[::every]], [label for _, label in marks[::every]], rotation=60,
                       ha="left", fontsize=7)
    question = answer.question if len(answer.question) <= 80 else answer.question[:80] + "…"
    ax.set_title(f"{Path(session.document.source).name}: {question}", fontsize=10, loc="left")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
