"""retrieval.select_blocks, the one entry to block selection: each of its
forms (one chunk at a time, batches of chunks, the fixed-shape step with a
device block count) against a loop-by-loop statement of the rule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmqa.engine.plan import PrefillBudget
from lmqa.engine.positions import landmark_slot, rotate
from lmqa.engine.retrieval import select_blocks

H, HKV, D, K = 6, 2, 8, 3
CPU = PrefillBudget.for_device(torch.device("cpu"))


def reference(queries, landmarks, n_before, k, slots, rows):
    """Per chunk and key/value head: the landmark of every block before the
    chunk rotated to its slot, softmax over those blocks of q . key / sqrt(d)
    per query row, max over the head group's rows of the chunk; the k best,
    ties to the newer block, ascending, missing ones first as -1."""
    C, _, W, d = queries.shape
    group = H // HKV
    ids = torch.full((C, HKV, k), -1)
    scores = torch.zeros(C, HKV, k)
    for c, n in enumerate(n_before):
        if not n:
            continue
        slot = landmark_slot(torch.arange(n - 1, -1, -1), k)
        keys = rotate(landmarks[:, :n].double(), slots[0][slot].double(), slots[1][slot].double())
        lo, hi = rows[c]
        for h in range(HKV):
            q = queries[c, h * group : (h + 1) * group, lo:hi].reshape(-1, d).double()
            best = torch.softmax(q @ keys[h].T / math.sqrt(d), dim=-1).amax(0)  # [n]
            r = min(k, n)
            order = sorted(range(n), key=lambda g: (best[g].item(), g))[-r:]
            ids[c, h, k - r :] = torch.tensor(sorted(order))
            scores[c, h, k - r :] = best[sorted(order)].float()
    return ids, scores


def case(seed, C=6, W=10, n=40):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(C, H, W, D, generator=g)
    landmarks = torch.randn(HKV, n, D, generator=g)
    angles = torch.randn(K + 1, D // 2, generator=g) * 3
    slots = (torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    n_before = [0, 1, 2, K, 17, n]
    rows = [(0, W), (3, W), (0, 4), (2, 9), (W - 1, W), (0, W)]
    return queries, landmarks, n_before[:C], slots, rows[:C]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("score_elements", [1, 1 << 20])
def test_host_forms_equal_the_rule(batched, score_elements):
    queries, landmarks, n_before, slots, rows = case(0)
    budget = dataclasses.replace(CPU, batched_scoring=batched, score_elements=score_elements)
    ids, scores = select_blocks(queries, landmarks, n_before, K, slots, rows=rows, budget=budget)
    want_ids, want_scores = reference(queries, landmarks, n_before, K, slots, rows)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=1e-5)


def test_fixed_shape_form_equals_the_rule():
    """A device block count (a CUDA graph's step): every landmark there is
    room for is scored, those past the count masked."""
    queries, landmarks, n_before, slots, rows = case(1, C=1, W=1)
    for n in (K, 17, 40):
        ids, scores = select_blocks(queries, landmarks, torch.tensor([n]), K, slots)
        want_ids, want_scores = reference(queries, landmarks, [n], K, slots, [(0, 1)])
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=1e-5)


def test_equal_keys_at_slot_zero_score_as_block_zero():
    """At layer 0 every landmark key is the landmark embedding's: like_first
    gives those at slot 0 bitwise block 0's score, so their ties go to the
    newest of them."""
    queries, landmarks, *_ = case(2, C=1)
    group = H // HKV
    # blocks 0..29 share one key, along the head's queries: they win, and tie
    queries[0] = queries[0, ::group, :1].repeat_interleave(group, 0)  # one query per key/value head
    landmarks[:, :30] = 2 * queries[0, ::group, 0, None]
    landmarks[:, 30:] *= 0.1
    like_first = (landmarks == landmarks[:, :1]).all(-1)
    no_turn = (torch.ones(6, D), torch.zeros(6, D))  # slots without rotation: the keys stay along the queries
    ids, scores = select_blocks(queries, landmarks, [40], 5, no_turn, like_first)
    assert torch.equal(ids[0], torch.arange(25, 30).expand(HKV, -1))
