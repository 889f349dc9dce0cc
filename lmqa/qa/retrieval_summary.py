"""What an answer read, for people: its evidence passages (always shown) and
the per-layer retrieval table (on request), each block as the file:line span
and text it came from, not a token range."""

from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from .evidence import Passage, excerpt
from .session import Answer, RetrievedBlock

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


def render_evidence(passages: list[Passage]) -> Group:
    """An "Evidence" heading, then per passage its file:line range, its share
    of the answer's attention and its text cut to a few lines."""
    if not passages:
        return Group(Text("Evidence: none (no document block was read while answering)", style="dim"))
    parts: list = [Text("Evidence", style="bold")]
    for i, passage in enumerate(passages, 1):
        head = Text(f"{i}. ")
        head.append(passage.location, style="cyan")
        blocks = passage.blocks
        span = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"
        quoted = "quoted by the answer, " if passage.quoted else ""
        head.append(f"  {span}, {quoted}{100 * passage.share:.1f}% of the answer's attention", style="dim")
        parts += [head, Padding(Text(excerpt(passage.text)), (0, 0, 0, 3))]
    return Group(*parts)
