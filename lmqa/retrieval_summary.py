"""Per-layer summary of what the engine retrieved, for people to read."""

from __future__ import annotations

from collections import defaultdict

from rich.table import Table

from .engine import LandmarkEngine


def block_counts(engine: LandmarkEngine) -> dict[int, dict[int, tuple[int, float]]]:
    """layer -> block id -> (times retrieved over heads and steps, best score)."""
    per_layer: dict[int, dict[int, tuple[int, float]]] = defaultdict(dict)
    for step in engine.trace.steps:
        for layer, (ids, scores) in enumerate(zip(step.block_ids, step.scores)):
            for block, score in zip(ids.flatten().tolist(), scores.flatten().tolist()):
                count, best = per_layer[layer].get(block, (0, 0.0))
                per_layer[layer][block] = (count + 1, max(best, score))
    return per_layer


def summarize(engine: LandmarkEngine, tokenizer, ids: list[int], doc_start: int, top: int) -> Table:
    """A table: per layer, its `top` most retrieved blocks with token span and snippet."""
    b = engine.config.block_size
    table = Table(title="retrieved blocks per layer (count over heads and steps, best score)", show_lines=False)
    for col in ("layer", "block", "tokens", "count", "score", "text"):
        table.add_column(col, justify="right" if col in ("layer", "block", "count", "score") else "left")
    for layer, blocks in sorted(block_counts(engine).items()):
        ranked = sorted(blocks.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]
        for i, (block, (count, score)) in enumerate(ranked):
            lo, hi = block * b, (block + 1) * b
            snippet = tokenizer.decode(ids[lo:hi]).replace("\n", " ").strip()
            where = f"doc {lo - doc_start}-{hi - doc_start}" if lo >= doc_start else f"prompt {lo}-{hi}"
            table.add_row(str(layer) if i == 0 else "", str(block), where, str(count), f"{score:.2f}",
                          snippet[:60] + ("…" if len(snippet) > 60 else ""))
    return table
