"""Pick the answer as a whole, not token by token.

Greedy decoding commits to the likeliest first token. For a quoting model
that first token chooses the passage: a wrong start ("Handsome, a ...")
then costs the model a little at every later token, while the passage that
holds the fact, once started, is copied at almost no cost. So the answer
is chosen among whole candidates: each of the `n` likeliest allowed first
tokens is completed greedily (under the same logits processors), scored by
the model's own log-probability of the whole answer and its stop per token
(length-normalised as beam search usually is: a total would favour short
fragments such as "It was." over the fact's whole sentence), and the
likeliest candidate wins.

The engine is rolled back after each candidate, and the winner is fed
again at the end, so the trace, the evidence recorder and on_token see
exactly one answer, as after generate().
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmqa.engine.generation import LogitsProcessor, SamplingConfig, apply_processors
from lmqa.engine.landmark_engine import LandmarkEngine


def best_answer(engine: LandmarkEngine, prompt_ids: list[int], cfg: SamplingConfig, stop_ids: set[int], n: int,
                processors: tuple[LogitsProcessor, ...] = (), on_token: Callable[[int], None] | None = None,
                on_prefill: Callable[[int], None] | None = None) -> list[int]:
    """generate()'s contract (greedy), choosing among n whole candidates."""
    raw = engine.feed(prompt_ids, progress=on_prefill).float().cpu()
    logits = apply_processors(raw, processors, [])
    finite = int(torch.isfinite(logits).sum())
    firsts = logits.topk(max(1, min(n, finite, logits.numel()))).indices.tolist()
    logp = torch.log_softmax(raw, -1)
    mark = engine.snapshot()
    best: tuple[float, list[int]] | None = None
    for first in firsts:
        candidate = _complete(engine, first, float(logp[first]), cfg.max_new_tokens, stop_ids, processors)
        engine.rollback(mark)
        if best is None or candidate[0] > best[0]:
            best = candidate
    out = [t for t in best[1] if t not in stop_ids]
    for t in out:  # the winner again, for the trace, the evidence and the stream
        if on_token is not None:
            on_token(t)
        engine.feed([t])
    return out


def _complete(engine: LandmarkEngine, first: int, score: float, max_new_tokens: int, stop_ids: set[int],
              processors: tuple[LogitsProcessor, ...]) -> tuple[float, list[int]]:
    """(mean log p per token of the answer and its stop, its tokens) from
    first on, greedily."""
    out = [first]
    if first in stop_ids:
        return score, out
    logits = engine.feed([first])
    while len(out) < max_new_tokens:
        raw = logits.float().cpu()
        token = int(apply_processors(raw, processors, out).argmax())
        score += float(torch.log_softmax(raw, -1)[token])
        if token in stop_ids:
            return score / (len(out) + 1), out
        out.append(token)
        logits = engine.feed([token])
    return score / len(out), out
