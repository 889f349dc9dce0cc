"""Machine-readable views of an answer: the one-object result of `ask --json`
and the full per-step, per-layer, per-head retrieval trace of `--trace`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmqa.atomic_file import atomic_path
from .evidence import passages
from lmqa.ingest import BlockSource
from .session import Answer, DocumentSession, RetrievedBlock


def source_json(source: BlockSource | None) -> dict[str, Any] | None:
    """A block's origin; `also` lists further files/chapters a block runs into."""
    if source is None:
        return None
    first = source.locations[0]
    return {"location": str(source), "title": first.title, "kind": first.kind, "line_start": first.line_start,
            "line_end": first.line_end, "char_start": source.char_start, "char_end": source.char_end,
            "snippet": source.snippet, "also": [str(loc) for loc in source.also]}


def _document_json(session: DocumentSession) -> dict[str, Any]:
    doc = session.document
    return {"source": doc.source, "kind": session.kind, "tokens": session.prepare(),
            "prompt_head_tokens": session.doc_token_start, "blocks": len(session.sources),
            "block_size": session.block_size, "segments": len(doc.segments), "skipped": doc.skipped.total}


def _timings_json(session: DocumentSession, answer: Answer) -> dict[str, Any]:
    t = answer.timings
    out = {**asdict(t), "tokens_per_s": t.tokens_per_s}
    if session.stats is not None:
        out["document_prefill_s"] = session.stats.seconds
        out["document_prefill_tokens_per_s"] = session.stats.tokens_per_s
    return out


def _retrieved_json(block: RetrievedBlock) -> dict[str, Any]:
    return {"block": block.block, "count": block.count, "best_score": block.best_score, "source": source_json(block.source)}


def result(session: DocumentSession, answer: Answer, top: int) -> dict[str, Any]:
    """What `ask --json` prints: answer, timings, evidence passages and, if
    top > 0, each layer's `top` blocks."""
    out = {"model": session.loaded.name, "document": _document_json(session), "question": answer.question,
           "answer": answer.text, "timings": _timings_json(session, answer),
           "evidence": [p.to_json() for p in passages(session, answer.evidence)]}
    if top:
        out["retrieved"] = [{"layer": layer, "blocks": [_retrieved_json(b) for b in blocks[:top]]}
                            for layer, blocks in enumerate(answer.per_layer())]
    return out


def trace(session: DocumentSession, answer: Answer) -> dict[str, Any]:
    """Every step of the answer (question prefill chunks, then one per
    generated token) with block_ids[layer][kv_head][rank] and the matching
    scores; `blocks` maps each block id that occurs to its source."""
    used = sorted({b for step in answer.steps for b in step.block_ids.unique().tolist()})
    return {"model": session.loaded.name, "top_k": session.loaded.landmark.top_k,
            "document": _document_json(session), "question": answer.question, "answer": answer.text,
            "timings": _timings_json(session, answer),
            "layout": "steps[i].block_ids[layer][kv_head][rank], scores alike; position = ordinary tokens before the step",
            "steps": [{"kind": s.kind, "position": s.position, "block_ids": s.block_ids.tolist(),
                       "scores": [[[round(x, 5) for x in head] for head in layer] for layer in s.scores.tolist()]}
                      for s in answer.steps],
            "blocks": {str(b): source_json(session.sources.get(b)) for b in used}}


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1))
