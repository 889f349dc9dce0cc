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
was."). The candidates are read side by side, many in one engine step
(read_scores, LandmarkEngine.read_branches): a hundred short feeds one by
one cost a hundred passes through every layer. A proposal whose first
token the processors forbid (the refusal rule decided to refuse) is not
read.

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
from lmqa.engine.plan import batches

RRF_K = 10  # reciprocal-rank fusion's constant (fused): small, so first ranks weigh most
BRANCH_POSITIONS = 2048  # candidate tokens read in one engine step (read_scores): a CPU's row tile



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
    after = engine.feed(ids, every=True)
    engine.rollback(mark)
    return _mean_logprob(first, after, ids, stop_ids)


def read_scores(engine: LandmarkEngine, logits: torch.Tensor, options: Sequence[list[int]],
                stop_ids: set[int]) -> list[float]:
    """read_score of every option, the options read side by side in engine
    steps of at most BRANCH_POSITIONS tokens (LandmarkEngine.read_branches);
    an option longer than a prefill chunk is read alone."""
    first = torch.log_softmax(logits.float().cpu(), -1)
    cfg = engine.config
    alone = lambda ids: engine.open_len + len(ids) + len(ids) // cfg.block_size + 1 > cfg.prefill_chunk  # noqa: E731
    scores = [read_score(engine, logits, ids, stop_ids) if not ids or alone(ids) else None for ids in options]
    todo = [i for i, s in enumerate(scores) if s is None]
    for lo, hi in batches([len(options[i]) for i in todo], BRANCH_POSITIONS):
        group = todo[lo:hi]
        for i, after in zip(group, engine.read_branches([options[i] for i in group])):
            scores[i] = _mean_logprob(first, after, options[i], stop_ids)
    return scores


def _mean_logprob(first: torch.Tensor, after: torch.Tensor, ids: list[int], stop_ids: set[int]) -> float:
    """Mean log p per token of ids and the likeliest stop, from the log p
    before them (first [vocab]) and the logits after each (after [len(ids), vocab])."""
    after = torch.log_softmax(after.float().cpu(), -1)
    total = float(first[ids[0]]) + float(after[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)].sum())
    return (total + max(float(after[-1, s]) for s in stop_ids)) / (len(ids) + 1)


def choose(engine: LandmarkEngine, logits: torch.Tensor, options: Sequence[list[int]], stop_ids: set[int],
           baseline: Sequence[float] | None = None) -> tuple[list[int], list[float]]:
    """The best of options and every option's score (see the module's rule)."""
    scores = read_scores(engine, logits, options, stop_ids)
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
