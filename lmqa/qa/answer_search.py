"""Pick the answer as a whole, not token by token.

Greedy decoding commits to the likeliest first token. For a quoting model
that first token chooses the passage: a wrong start ("Handsome, a ...")
then costs the model a little at every later token, while the passage that
holds the fact, once started, is copied at almost no cost. So the answer
is chosen among whole candidates:
  * each of the `n` likeliest allowed first tokens, completed greedily
    (under the same logits processors);
  * `proposals`: whole answers given token by token (sentences of the
    document, see DocumentSession.proposals), each read by the model as if
    it had written it. Greedy completion misses the fact's sentence when its
    second token is not the likeliest; a proposal cannot.
Each candidate is read in one short feed (read_score): the model's mean
log-probability per token of the answer and its stop (length-normalised,
as beam search usually is: a total would favour fragments such as "It
was."). A proposal whose first token the processors forbid (the refusal
rule decided to refuse) is not read.

Mean log-probability alone favours text that is easy to predict whatever
was asked: a licence line, a title, the document's first or last lines
(a book's "HARTFORD, 1876." won every question of a dev set). So the
session can pass `baseline`: the same candidates' scores after a question
that asks nothing in particular. A candidate then scores by how much the
question raised its likelihood over all its tokens, log p(answer | question)
- log p(answer | neutral question): the pointwise mutual information of
question and answer given the document. Summed, not averaged: a sentence
the question makes a little likelier at every one of its 40 tokens is
a better answer than a 6-token title it makes somewhat likelier.

A 135M model's gain is still a noisy judge of a paraphrased question:
on whole held-out books the plain BM25-best sentence was right more often
than the model's pick (17/42 against 3/42 on Alice). So the session ranks
options by both, fused by rank (fused): the gain and the BM25 score of the
sentence each option quotes. The winner is fed again at the end (emit), so
the trace, the evidence recorder and on_token see exactly one answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmqa.engine.generation import LogitsProcessor, apply_processors
from lmqa.engine.landmark_engine import LandmarkEngine

RRF_K = 10  # reciprocal-rank fusion's constant (fused): small, so first ranks weigh most



def candidates(engine: LandmarkEngine, logits: torch.Tensor, n: int, max_new_tokens: int, stop_ids: set[int],
               processors: tuple[LogitsProcessor, ...] = (), proposals: Sequence[list[int]] = ()) -> list[list[int]]:
    """The n greedy completions of the likeliest allowed first tokens, then
    the proposals whose first token is allowed, each once, stops dropped;
    the engine is left where it was."""
    allowed = apply_processors(logits.float().cpu(), processors, [])
    finite = int(torch.isfinite(allowed).sum())
    firsts = allowed.topk(max(1, min(n, finite, allowed.numel()))).indices.tolist()
    out, seen = [], set()
    for ids in [_complete(engine, first, max_new_tokens, stop_ids, processors) for first in firsts] + list(proposals):
        ids = [t for t in ids[:max_new_tokens] if t not in stop_ids]
        if tuple(ids) not in seen and (not ids or torch.isfinite(allowed[ids[0]])):
            seen.add(tuple(ids))
            out.append(ids)
    return out


def read_score(engine: LandmarkEngine, logits: torch.Tensor, ids: list[int], stop_ids: set[int]) -> float:
    """Mean log p per token of ids and the likeliest stop after them, from the
    engine's state (logits: its next-token logits), read in one feed; the
    engine is left where it was."""
    first = torch.log_softmax(logits.float().cpu(), -1)
    if not ids:
        return max(float(first[s]) for s in stop_ids)
    mark = engine.snapshot()
    after = torch.log_softmax(engine.feed(ids, every=True).float().cpu(), -1)  # [len(ids), vocab]
    engine.rollback(mark)
    total = float(first[ids[0]]) + float(after[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)].sum())
    return (total + max(float(after[-1, s]) for s in stop_ids)) / (len(ids) + 1)


def choose(engine: LandmarkEngine, logits: torch.Tensor, options: Sequence[list[int]], stop_ids: set[int],
           baseline: Sequence[float] | None = None) -> tuple[list[int], list[float]]:
    """The best of options and every option's score (see the module's rule)."""
    scores = [read_score(engine, logits, ids, stop_ids) for ids in options]
    if baseline is not None:  # means per token (answer and stop) -> the answer's total gain
        scores = [(s - b) * (len(ids) + 1) for s, b, ids in zip(scores, baseline, options)]
    best = max(range(len(options)), key=scores.__getitem__)
    return options[best], scores


def fused(*scores: Sequence[float], k: float = RRF_K) -> list[float]:
    """Reciprocal-rank fusion of several scorings of the same options: each
    option gets the sum over scorings of 1 / (k + its rank), rank 0 best.
    Ranks, not values, so scales that cannot be compared (a total gain in
    nats, a BM25 score) still combine."""
    out = [0.0] * len(scores[0])
    for scoring in scores:
        for rank, i in enumerate(sorted(range(len(scoring)), key=lambda i: -scoring[i])):
            out[i] += 1.0 / (k + rank)
    return out


def emit(engine: LandmarkEngine, ids: list[int], on_token: Callable[[int], None] | None = None) -> list[int]:
    """Stream the chosen answer and feed it in one step, as the model's own
    answer: the trace and an evidence recorder see its tokens (each token's
    query is recorded; the step's retrieval is the chunk's). Token by token
    this took 72 s for a 185-token list answer on a loaded 2-core CPU."""
    for t in ids:
        if on_token is not None:
            on_token(t)
    if ids:
        engine.feed(list(ids))
    return list(ids)


def _complete(engine: LandmarkEngine, first: int, max_new_tokens: int, stop_ids: set[int],
              processors: tuple[LogitsProcessor, ...]) -> list[int]:
    """Greedy from first on (under the processors); the engine is rolled back."""
    mark, out = engine.snapshot(), [first]
    if first not in stop_ids:
        logits = engine.feed([first])
        while len(out) < max_new_tokens:
            token = int(apply_processors(logits.float().cpu(), processors, out).argmax())
            if token in stop_ids:
                break
            out.append(token)
            logits = engine.feed([token])
    engine.rollback(mark)
    return out
