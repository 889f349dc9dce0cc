"""Layer-major prefill (step.landmark_layer over all the chunks of a super-chunk) against the chunk-serial engine.

The serial engine is the reference (tests/test_engine.py checks it against the
training-form forward), so here both paths must retrieve the same blocks,
give the same logits and leave the same state, on layouts that exercise every
edge of the chunk schedule.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.engine.plan import Chunk, batches, plan_chunks, super_chunks
from lmqa.engine.retrieval import _largest_by_max, top_blocks

from conftest import TINY_LANDMARK, landmark_engine as engine, make_tiny_llama, random_ids

TOL = 1e-4
VOCAB = 128
LANDMARK = TINY_LANDMARK


@pytest.fixture(scope="module")
def gqa_model():
    return make_tiny_llama(vocab=VOCAB, hidden=48, heads=6, kv_heads=2, layers=2, seed=0)


@pytest.fixture(scope="module")
def gqa31_model():
    """3 query heads per key/value head, as SmolLM2-135M (9:3)."""
    return make_tiny_llama(vocab=VOCAB, hidden=36, heads=3, kv_heads=1, layers=3, seed=4)




def assert_same_state(serial: LandmarkEngine, layer: LandmarkEngine):
    assert (layer.n_tokens, layer.n_blocks, layer.open_len) == (serial.n_tokens, serial.n_blocks, serial.open_len)
    assert len(layer.trace.steps) == len(serial.trace.steps)
    for s, l in zip(serial.trace.steps, layer.trace.steps):
        assert (l.kind, l.position) == (s.kind, s.position)
        assert torch.equal(l.block_ids, s.block_ids), s.position
        assert torch.allclose(l.scores, s.scores, atol=1e-5)
    for s, l in zip(serial.stores, layer.stores):
        assert torch.allclose(l.landmark_keys.view(), s.landmark_keys.view(), atol=1e-5)
        assert torch.allclose(l.keys.view(torch.float32), s.keys.view(torch.float32), atol=1e-5)
        assert torch.allclose(l.values.view(torch.float32), s.values.view(torch.float32), atol=1e-5)
    for a, c in zip(serial.open.keys + serial.open.values, layer.open.keys + layer.open.values):
        assert a.shape == c.shape and torch.allclose(a, c, atol=1e-5)


def logit_diff(a, b):
    keep = torch.arange(VOCAB) != LANDMARK
    return (a[keep] - b[keep]).abs().max().item()


# (tokens, block size, top-k, chunk positions): shorter than one chunk or one
# block, exact multiples of the chunk, partial open blocks at the end, chunks
# that are not a multiple of the slot, top-k above the stored blocks, k = 1
LAYOUTS = [(3, 4, 2, 10), (9, 4, 2, 10), (40, 4, 2, 10), (100, 3, 2, 8), (97, 5, 4, 7), (250, 7, 2, 16),
           (160, 4, 3, 15), (120, 3, 1, 4), (64, 2, 8, 9), (77, 6, 3, 28)]


@pytest.mark.parametrize("n,b,k,chunk", LAYOUTS)
def test_layer_major_equals_chunk_serial(gqa_model, n, b, k, chunk):
    ids = random_ids(n, seed=n + b)
    serial, layer = engine(gqa_model, "serial", b, k, chunk), engine(gqa_model, "layer", b, k, chunk)
    assert logit_diff(serial.feed(ids), layer.feed(ids)) <= TOL
    assert_same_state(serial, layer)


@pytest.mark.parametrize("n,b,k,chunk", [(150, 4, 2, 15), (130, 5, 3, 12)])
def test_gqa_3_to_1(gqa31_model, n, b, k, chunk):
    ids = random_ids(n, seed=7)
    serial, layer = engine(gqa31_model, "serial", b, k, chunk), engine(gqa31_model, "layer", b, k, chunk)
    assert logit_diff(serial.feed(ids), layer.feed(ids)) <= TOL
    assert_same_state(serial, layer)


@pytest.mark.parametrize("cuts", [[7, 8, 20, 21, 33], [1, 2, 3, 16, 17], [30, 60], [45]])
def test_several_feeds_equal_serial(gqa_model, cuts):
    """Pieces ending mid-block, on a block end, one token long; then decoding."""
    b, k, chunk, n = 4, 2, 10, 90
    ids = random_ids(n, seed=11)
    serial, layer = engine(gqa_model, "serial", b, k, chunk), engine(gqa_model, "layer", b, k, chunk)
    bounds = [0, *cuts, n]
    for lo, hi in zip(bounds, bounds[1:]):
        assert logit_diff(serial.feed(ids[lo:hi]), layer.feed(ids[lo:hi])) <= TOL, (lo, hi)
    for t in random_ids(5, seed=3):
        assert logit_diff(serial.feed([t]), layer.feed([t])) <= TOL
    assert_same_state(serial, layer)


def test_feeds_split_at_chunk_ends_equal_one_feed(gqa_model):
    """Split where the serial schedule ends a chunk, two feeds are one feed."""
    b, k, chunk = 4, 2, 10
    ids = random_ids(83, seed=5)
    once, twice = engine(gqa_model, "layer", b, k, chunk), engine(gqa_model, "layer", b, k, chunk)
    at = 8 * 4  # 32 tokens + 8 landmarks = 4 chunks of 10 positions
    twice.feed(ids[:at])
    assert logit_diff(once.feed(ids), twice.feed(ids[at:])) <= TOL
    assert_same_state(once, twice)


@pytest.mark.parametrize("batched_scoring", [False, True])
def test_tiny_budgets_split_super_chunks_and_batches(gqa_model, batched_scoring):
    """Super-chunks of one or two chunks, batches of one chunk and score tiles
    of one query row give the same result."""
    b, k, chunk, n = 4, 3, 10, 200
    ids = random_ids(n, seed=9)
    serial, layer = engine(gqa_model, "serial", b, k, chunk), engine(gqa_model, "layer", b, k, chunk)
    layer.prefill_budget = dataclasses.replace(layer.prefill_budget, positions=15, score_elements=1,
                                               attention_elements=1, row_tile=7, batched_scoring=batched_scoring)
    assert logit_diff(serial.feed(ids), layer.feed(ids)) <= TOL
    assert_same_state(serial, layer)


@pytest.mark.parametrize("query_tile", [1 << 20, 2])
def test_whole_window_tiles_and_device_store(gqa_model, query_tile):
    """The GPU settings (one attention call per window or per few query
    blocks, batched landmark scoring, blocks in the device store) on CPU."""
    b, k, chunk, n = 4, 2, 15, 150
    ids = random_ids(n, seed=13)
    serial = engine(gqa_model, "serial", b, k, chunk)
    layer = engine(gqa_model, "layer", b, k, chunk, offload="device")
    layer.prefill_budget = dataclasses.replace(layer.prefill_budget, query_tile=query_tile, batched_scoring=True)
    assert logit_diff(serial.feed(ids), layer.feed(ids)) <= TOL
    assert_same_state(serial, layer)


def test_bfloat16_fast_path_stays_close_to_the_serial_reference():
    """In bfloat16 the CPU's layer-major attention runs its matmuls in
    bfloat16 (last_block_attention) while the serial engine keeps float32:
    the logits may differ by bfloat16 rounding, not more, and retrieval
    agrees but for near ties."""
    model = make_tiny_llama(vocab=VOCAB, hidden=48, heads=6, kv_heads=2, layers=2, seed=0, init=0.05).bfloat16()
    b, k, chunk = 4, 2, 16
    ids = random_ids(300, seed=21)
    serial, layer = engine(model, "serial", b, k, chunk), engine(model, "layer", b, k, chunk)
    a, c = serial.feed(ids).float(), layer.feed(ids).float()
    keep = torch.arange(VOCAB) != LANDMARK
    assert torch.corrcoef(torch.stack([a[keep], c[keep]]))[0, 1] > 0.99
    assert logit_diff(a, c) <= 0.05 * a[keep].abs().max().item()
    same = sum(torch.equal(s.block_ids, l.block_ids) for s, l in zip(serial.trace.steps, layer.trace.steps))
    assert same >= 0.8 * len(serial.trace.steps)


def test_int8_store_and_rollback(gqa_model):
    """Retrieved blocks come through the store (int8 round trip included), and
    a snapshot taken after a layer-major feed rolls back as after a serial one."""
    b, k, chunk = 4, 2, 10
    ids = random_ids(120, seed=17)
    serial = engine(gqa_model, "serial", b, k, chunk, kv_dtype=torch.int8)
    layer = engine(gqa_model, "layer", b, k, chunk, kv_dtype=torch.int8)
    serial.feed(ids[:70]), layer.feed(ids[:70])
    marks = serial.snapshot(), layer.snapshot()
    assert logit_diff(serial.feed(ids[70:]), layer.feed(ids[70:])) <= TOL
    serial.rollback(marks[0]), layer.rollback(marks[1])
    assert logit_diff(serial.feed(ids[90:]), layer.feed(ids[90:])) <= TOL
    assert_same_state(serial, layer)


def test_progress_counts_every_position(gqa_model):
    layer = engine(gqa_model, "layer", 4, 2, 10)
    seen = []
    layer.feed(random_ids(50, seed=1), progress=seen.append)
    assert sum(seen) == 50 + 50 // 4


def test_plan_chunks_mirrors_the_serial_loop():
    assert plan_chunks(25, 0, 10, 5) == [Chunk(0, 10), Chunk(10, 10), Chunk(20, 5)]
    assert plan_chunks(12, 3, 10, 5) == [Chunk(0, 7), Chunk(7, 5)]
    assert plan_chunks(3, 4, 2, 5) == [Chunk(0, 1), Chunk(1, 2)]  # open block longer than a chunk
    assert super_chunks([Chunk(0, 7), Chunk(7, 10), Chunk(17, 5)], 17) == [[Chunk(0, 7), Chunk(7, 10)], [Chunk(17, 5)]]
    assert batches([3, 3, 5, 1], 6) == [(0, 2), (2, 4)]
    assert batches([9, 1], 4) == [(0, 1), (1, 2)]


def test_bad_prefill_name(gqa_model):
    with pytest.raises(ValueError, match="prefill"):
        engine(gqa_model, "columnwise", 4, 2, 10)


def first_flip(serial: LandmarkEngine, layer: LandmarkEngine, since: int) -> int | None:
    """The first trace step from `since` where the two engines chose different
    blocks, after checking it is a tie: the chosen scores, sorted, agree, so
    each engine took a block the other scored as high (a wrong choice would
    not); None when all steps agree."""
    for i, (s, l) in enumerate(zip(serial.trace.steps[since:], layer.trace.steps[since:]), since):
        if not torch.equal(s.block_ids.cpu(), l.block_ids.cpu()):
            first = next(j for j in range(len(s.block_ids)) if not torch.equal(s.block_ids[j].cpu(), l.block_ids[j].cpu()))
            a, c = (x.scores[first].cpu().sort(dim=-1).values for x in (s, l))
            assert torch.allclose(a, c, atol=1e-5, rtol=1e-4), (s.position, first, a, c)
            return i
    return None


@pytest.mark.cuda
@pytest.mark.parametrize("offload", ["device", "cpu", "auto"])
def test_cuda_layer_major_equals_serial(offload):
    """The CUDA paths (device-resident or pinned host blocks, auto's choice)
    against the serial engine there. On a GPU the batched and the per-chunk
    matmuls round differently (~1e-6), so two blocks scored within that of
    each other may be ranked either way, and from such a tie on the engines
    rightly read different blocks: until the first tie everything must match,
    and at it the chosen scores must agree (first_flip)."""
    model = make_tiny_llama(vocab=VOCAB, hidden=48, heads=6, kv_heads=2, layers=2, seed=0).cuda()
    b, k, chunk = 4, 3, 15
    ids = random_ids(300, seed=19)
    serial = engine(model, "serial", b, k, chunk, offload=offload)
    layer = engine(model, "layer", b, k, chunk, offload=offload)
    assert logit_diff(serial.feed(ids[:250]).cpu(), layer.feed(ids[:250]).cpu()) <= TOL
    assert layer.offload == serial.offload and first_flip(serial, layer, 0) is None
    assert_same_state(serial, layer)
    for t in ids[250:]:
        seen = len(serial.trace.steps)
        a, c = serial.feed([t]).cpu(), layer.feed([t]).cpu()
        if first_flip(serial, layer, seen) is not None:
            return
        assert logit_diff(a, c) <= TOL
    assert_same_state(serial, layer)


def test_cli_prefill_and_verbose_offload(tiny_model_dir):
    from typer.testing import CliRunner

    from lmqa.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    res = invoke("-v", "passkey", "-m", tiny_model_dir, "--length", 200, "--trials", 1, "--device", "cpu",
                 "--prefill", "serial")
    assert res.exit_code == 0, res.output
    assert "block keys/values: host memory; serial prefill" in res.output and "in host memory:" in res.output
    res = invoke("bench", "-m", tiny_model_dir, "--lengths", 300, "--max-full", 0, "--new-tokens", 2, "--device", "cpu",
                 "--prefill", "both")
    assert res.exit_code == 0, res.output
    assert "landmark-serial" in res.output and "layer-major prefill at 300 tokens:" in res.output
    res = invoke("bench", "-m", tiny_model_dir, "--lengths", "200,300", "--max-full", 200, "--new-tokens", 2,
                 "--device", "cpu", "--prefill", "both", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # nothing but the JSON on stdout
    assert [(r["method"], r["tokens"]) for r in data["rows"]] == [
        ("landmark", 200), ("landmark-serial", 200), ("full", 200), ("landmark", 300), ("landmark-serial", 300)]
    by = {(r["method"], r["tokens"]): r for r in data["rows"]}
    (ratio,) = [x for x in data["layer_vs_serial"] if x["tokens"] == 300]
    assert ratio["prefill"] == by["landmark", 300]["prefill_tok_s"] / by["landmark-serial", 300]["prefill_tok_s"]
    assert {g["method"]: (g["from"], g["to"]) for g in data["decode_growth"]} == {
        "landmark": (200, 300), "landmark-serial": (200, 300)}
    for bad in (["passkey", "--prefill", "diagonal"], ["bench", "--prefill", "layer,rows"], ["passkey", "--kv-offload", "gpu"]):
        res = invoke(*bad, "-m", tiny_model_dir, "--device", "cpu")
        assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output, res.output


def test_top_blocks_equals_a_stable_sort_with_ties_to_the_newest_block():
    """top_blocks' integer keys against the obvious statement of its rule:
    the k best scores, ties to the larger (more recent) block id, ids ascending;
    with probabilities, log-probabilities, -inf, many ties and signed zeros."""
    def reference(scores, k):
        newest_first = scores.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :k]
        return (scores.shape[-1] - 1 - newest_first).sort(dim=-1).values

    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        n, k = int(torch.randint(5, 300, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        s = torch.randn(2, 3, n, generator=g)
        if trial % 4 == 1:
            s = torch.softmax(s, -1)
        elif trial % 4 == 2:
            s = torch.log_softmax(s, -1)
            s[..., : n // 3] = float("-inf")
        elif trial % 4 == 3:
            s = torch.round(s * 2) / 2  # ties, including -0.0 against 0.0
        s[..., torch.randint(0, n, (n // 4,), generator=g)] = s[..., :1]
        ids, scores = top_blocks(s, k)
        assert torch.equal(ids, reference(s, k)), trial
        assert torch.equal(scores, s.gather(-1, ids))
        key = torch.randperm(n * 6, generator=g).view(2, 3, n).long() - 3 * n  # unique, some negative
        assert torch.equal(_largest_by_max(key, k).sort(-1).values, key.topk(k).values.sort(-1).values)


@pytest.mark.cuda
def test_top_blocks_on_cuda_equals_the_cpu_rule():
    """On CUDA top_blocks takes the k largest keys by max-reductions."""
    g = torch.Generator().manual_seed(1)
    for trial in range(50):
        s = torch.round(torch.randn(3, 20000, generator=g) * 4) / 4  # many ties
        if trial % 2:
            s = torch.softmax(s * 8, -1)  # many probabilities of exactly 0
        for k in (1, 5):
            ids, scores = top_blocks(s.cuda(), k)
            want, _ = top_blocks(s, k)
            assert torch.equal(ids.cpu(), want), trial
