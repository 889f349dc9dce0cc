"""How sure the model must be before it answers "The document does not say.".

Trained with a few unanswerable questions, the shipped model says "The
document does not say." for many questions whose answer it has found: on
needle QA the sentence with the fact is often only a few nats less likely
than the refusal. AbstentionPrior is a logits processor for generate() that
weighs the refusal as one whole answer against the best real first token,
and refuses only when the refusal is more likely by `margin` nats:

    log p(refusal) - margin  >  max over other first tokens t of log p(t)

(the refusal's own first token counts for what it leads to besides the
refusal). The margin is a model setting (`[answer] abstain_margin` in its
manifest), calibrated by scripts/calibrate_refusal.py on questions asked of
training books, never on evaluation needles; at 0 the model refuses
whenever the refusal is the likelier answer, and models without the setting
decode as they always did.

Scoring the refusal needs its log-probability: one look-ahead feed of its
tokens on the engine, rolled back before the answer is generated.
"""

from __future__ import annotations

import math

import torch

from lmqa.engine.generation import keep_only
from lmqa.engine.landmark_engine import LandmarkEngine


class AbstentionPrior:
    """Decides at the first answer token: then either forces the refusal's
    tokens or forbids the path into it. Call with each answer's logits in
    order; a new answer (empty `generated`) decides again."""

    def __init__(self, engine: LandmarkEngine, refusal_ids: list[int], stop_ids: set[int], margin: float):
        if len(refusal_ids) < 2:
            raise ValueError("the refusal must be at least two tokens long")
        self.engine = engine
        self.refusal = list(refusal_ids)
        self.stop_ids = set(stop_ids)
        self.margin = margin
        self.refuse: bool | None = None
        self.scores: tuple[float, float] | None = None  # (log p(refusal), best other first token), for reports

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        n = len(generated)
        if n == 0:
            self.refuse, logits = self._decide(logits)
            return logits
        on_path = n < len(self.refusal) and generated == self.refusal[:n]
        if self.refuse and generated == self.refusal:
            return keep_only(logits, sorted(self.stop_ids))
        if self.refuse and on_path:
            return keep_only(logits, [self.refusal[n]])
        if not self.refuse and on_path:
            logits = logits.clone()
            logits[self.refusal[n]] = float("-inf")
        return logits

    def _decide(self, logits: torch.Tensor) -> tuple[bool, torch.Tensor]:
        logp = torch.log_softmax(logits, -1)
        refusal, onward = self._refusal_logprob(logp)
        first = self.refusal[0]
        # the refusal's first token, for what it leads to besides the refusal
        rest = float(logp[first]) + math.log1p(-min(math.exp(onward), 1 - 1e-9))
        others = logp.clone()
        others[first] = float("-inf")
        best = max(float(others.max()), rest)
        self.scores = (refusal, best)
        if refusal - self.margin > best:
            return True, keep_only(logits, [first])
        logits = logits.clone()
        logits[first] = logits[first] + (rest - float(logp[first]))
        return False, logits

    def _refusal_logprob(self, logp: torch.Tensor) -> tuple[float, float]:
        """(log p of the whole refusal and a stop after it, log p of its
        second token after its first), from one look-ahead feed of the
        refusal's tokens (every position's logits), rolled back after."""
        mark = self.engine.snapshot()
        try:
            steps = torch.log_softmax(self.engine.feed(self.refusal, every=True).float().cpu(), -1)  # [len, vocab]
        finally:
            self.engine.rollback(mark)
        following = torch.tensor(self.refusal[1:])
        inner = steps[:-1].gather(1, following[:, None])[:, 0]  # log p of each next refusal token  # [len - 1]
        end = float(torch.logsumexp(steps[-1, sorted(self.stop_ids)], 0))
        return float(logp[self.refusal[0]]) + float(inner.sum()) + end, float(inner[0])


def choose_margin(records: list[dict], answerable: float, grid: tuple[float, ...] = tuple(x / 2 for x in range(17))
                  ) -> tuple[float, dict[float, tuple[float, float, float]]]:
    """The margin that gets most questions right when a share `answerable`
    of them have an answer, from calibration records (answerable, correct:
    right when made to answer; refusal, best: the two scores). Returns it
    (the smallest of equals: refusing is the honest failure) and, per margin,
    (answerable right, unanswerable refused, expected right)."""
    scores = {}
    for m in grid:
        def refused(r: dict) -> bool:
            return r["refusal"] - m > r["best"]

        yes = [r for r in records if r["answerable"]]
        no = [r for r in records if not r["answerable"]]
        right = sum(r["correct"] and not refused(r) for r in yes) / max(len(yes), 1)
        refuse = sum(refused(r) for r in no) / max(len(no), 1)
        scores[m] = (right, refuse, answerable * right + (1 - answerable) * refuse)
    best = max(scores.values(), key=lambda s: s[2])[2]
    return min(m for m, s in scores.items() if s[2] == best), scores
