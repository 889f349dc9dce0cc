"""LandmarkEngine.read_branches: candidate answers read side by side give what
reading each alone gives (feed(every=True), then a rollback), and change nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import landmark_engine, make_tiny_llama, random_ids


def _state(engine):
    blocks = [(c.n_blocks, c.open_len, c.open_block()[0].clone(), c.store.landmark_keys.view().clone())
              for c in engine.caches]
    return engine.n_tokens, len(engine.trace.steps), blocks


def _alone(engine, ids):
    mark = engine.snapshot()
    out = engine.feed(ids, every=True)
    engine.rollback(mark)
    return out


@pytest.mark.parametrize("b,k,context,lengths", [
    (4, 2, 37, [1, 3, 9, 2, 14]),  # branches that close blocks of their own, from an open block of 2
    (7, 3, 56, [5, 6, 20]),  # from an empty open block
    (5, 2, 3, [4, 7]),  # fewer stored blocks than k
])
def test_branches_read_as_each_alone(b, k, context, lengths):
    model = make_tiny_llama(vocab=128, layers=2, kv_heads=2, seed=b)
    engine = landmark_engine(model, "serial", b, k, chunk=4 * (b + 1))
    engine.feed(random_ids(context, seed=1))
    before = _state(engine)
    branches = [random_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    together = engine.read_branches(branches)
    after = _state(engine)
    assert before[:2] == after[:2]
    for (n0, p0, open0, lm0), (n1, p1, open1, lm1) in zip(before[2], after[2]):
        assert (n0, p0) == (n1, p1) and torch.equal(open0, open1) and torch.equal(lm0, lm1)
    for ids, got in zip(branches, together):
        want = _alone(engine, ids)
        assert got.shape == want.shape == (len(ids), 128)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_branches_longer_than_a_chunk_are_refused():
    model = make_tiny_llama(vocab=128, layers=1, kv_heads=2, seed=0)
    engine = landmark_engine(model, "serial", 4, 2, chunk=10)
    engine.feed(random_ids(12, seed=1))
    with pytest.raises(ValueError, match="prefill chunk"):
        engine.read_branches([random_ids(12, seed=2)])
    with pytest.raises(ValueError, match="at least one token"):
        engine.read_branches([[1], []])


def test_read_scores_equal_reading_each_option_alone(monkeypatch):
    """answer_search.read_scores (side by side, in groups) against read_score
    (one feed each), with an empty option and one longer than a prefill chunk."""
    from lmqa.qa import answer_search
    from lmqa.qa.answer_search import read_score, read_scores

    model = make_tiny_llama(vocab=128, layers=2, kv_heads=2, seed=4)
    engine = landmark_engine(model, "serial", 4, 2, chunk=30)
    logits = engine.feed(random_ids(23, seed=3))
    options = [random_ids(n, seed=20 + n) for n in (3, 0, 8, 1, 26, 5)]
    stops = {5, 6}
    alone = [read_score(engine, logits, ids, stops) for ids in options]
    for group in (2048, 9):  # all in one step; a few per step
        monkeypatch.setattr(answer_search, "BRANCH_POSITIONS", group)
        assert read_scores(engine, logits, options, stops) == pytest.approx(alone, abs=1e-5)
    assert engine.n_tokens == 23
