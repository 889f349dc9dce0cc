"""Per-layer summary of what an answer retrieved, for people to read: each
block as the file:line span and snippet it came from, not a token range."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .qa import Answer, RetrievedBlock

TITLE = "retrieved blocks per layer (count over heads and steps, best score)"
SNIPPET_WIDTH = 40  # the snippet folds onto more lines rather than squeezing out the numbers
SOURCE_WIDTH = 40  # file:line spans stay on one line up to this width


def where(block: RetrievedBlock) -> str:
    """file:line span of a document block; prompt or question text otherwise."""
    return str(block.source) if block.source is not None else "(prompt / question)"


def summarize(answer: Answer, top: int) -> Table:
    """A table: per layer, its `top` most retrieved blocks."""
    ranked = [blocks[:top] for blocks in answer.per_layer()]
    widest = max((len(where(b)) for blocks in ranked for b in blocks), default=0)
    table = Table(title=TITLE)
    for col, justify in (("layer", "right"), ("block", "right"), ("source", "left"), ("count", "right"),
                         ("score", "right"), ("text", "left")):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col != "text",
                         min_width=min(widest, SOURCE_WIDTH) if col == "source" else None,
                         max_width=SNIPPET_WIDTH if col == "text" else None)
    for layer, blocks in enumerate(ranked):
        for i, block in enumerate(blocks):
            snippet = block.source.snippet if block.source is not None else ""
            table.add_row(str(layer) if i == 0 else "", str(block.block), escape(where(block)), str(block.count),
                          f"{block.best_score:.2f}", escape(snippet), end_section=i == len(blocks) - 1)
    return table
