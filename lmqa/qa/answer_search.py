"""Pick the answer as a whole, not token by token.

Greedy decoding commits to the likeliest first token. For a quoting model
that first token chooses the passage: a wrong start ("Handsome, a ...")
then costs the model a little at every later token, while the passage that
holds the fact, once started, is copied at almost no cost. So the answer
is chosen among whole candidates:
  * each of the `n` likeliest allowed first tokens, completed greedily
    (under the same logits processors);
  * `proposals`: whole answers given token by token (the sentences of the
    passages the question read most, see DocumentSession), each read by the
    model as if it had written it. Greedy completion misses the fact's
    sentence when its second token is not the likeliest ("The" + "best of
    the party" instead of "The" + "mayor ..."); a proposal cannot.
Each is scored by the model's own log-probability of the whole answer and
its stop per token (length-normalised as beam search usually is: a total
would favour short fragments such as "It was." over the fact's whole
sentence), and the likeliest candidate wins. A proposal whose first token
the processors forbid (the refusal rule decided to refuse) is not read, and
one is dropped as soon as it can no longer win: later tokens only lower
its mean.

The engine is rolled back after each candidate, and the winner is fed
again at the end, so the trace, the evidence recorder and on_token see
exactly one answer, as after generate().
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lmqa.engine.generation import LogitsProcessor, SamplingConfig, apply_processors
from lmqa.engine.landmark_engine import LandmarkEngine


def best_answer(engine: LandmarkEngine, logits: torch.Tensor, cfg: SamplingConfig, stop_ids: set[int], n: int,
                processors: tuple[LogitsProcessor, ...] = (), proposals: Iterable[list[int]] = (),
                on_token: Callable[[int], None] | None = None) -> list[int]:
    """generate()'s contract (greedy) after a prompt whose next-token logits
    are `logits`, choosing among n greedy candidates and the proposals."""
    raw = logits.float().cpu()
    allowed = apply_processors(raw, processors, [])
    finite = int(torch.isfinite(allowed).sum())
    firsts = allowed.topk(max(1, min(n, finite, allowed.numel()))).indices.tolist()
    logp = torch.log_softmax(raw, -1)
    mark = engine.snapshot()
    best: tuple[float, list[int]] | None = None
    for first in firsts:
        candidate = _complete(engine, first, float(logp[first]), cfg.max_new_tokens, stop_ids, processors)
        engine.rollback(mark)
        if best is None or candidate[0] > best[0]:
            best = candidate
    tried = {tuple(best[1])}
    for ids in proposals:
        ids = ids[: cfg.max_new_tokens]
        if not ids or tuple(ids) in tried or not torch.isfinite(allowed[ids[0]]):
            continue
        tried.add(tuple(ids))
        score = _read(engine, ids, logp, stop_ids, best[0])
        engine.rollback(mark)
        if score is not None and score > best[0]:
            best = (score, ids)
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


def _read(engine: LandmarkEngine, ids: list[int], first: torch.Tensor, stop_ids: set[int], bar: float) -> float | None:
    """The mean log p per token of ids and the likeliest stop after them, as
    _complete scores a candidate (first: log p of the first token); None as
    soon as the mean can no longer exceed bar."""
    total, length = float(first[ids[0]]), len(ids) + 1
    for i in range(1, length):
        if total / length <= bar:
            return None
        logp = torch.log_softmax(engine.feed([ids[i - 1]]).float().cpu(), -1)
        total += float(logp[ids[i]]) if i < len(ids) else max(float(logp[s]) for s in stop_ids)
    return total / length
