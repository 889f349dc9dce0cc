"""The fixed-shape decoding step (lmqa/engine/graph_decode.py) against the
engine's eager token step: eagerly on CPU, captured as a CUDA graph on a GPU."""

from __future__ import annotations

import pytest
import torch

from lmqa.engine.graph_decode import GraphDecoder
from lmqa.qa.evidence import EvidenceRecorder

from conftest import make_tiny_llama
from test_layer_prefill import TOL, assert_same_state, engine, first_flip, logit_diff, random_ids


def pair(model, capture: bool, b=4, k=3, chunk=15):
    """(eager reference, engine decoding through GraphDecoder), blocks on the
    device. Both prefill serially: on a GPU the layer-major prefill may break
    a retrieval tie the other way (test_layer_prefill's first_flip), and the
    blocks it then stores differ from the reference's."""
    ref = engine(model, "serial", b, k, chunk, offload="device")
    ref.decoder = None
    fast = engine(model, "serial", b, k, chunk, offload="device")
    fast.decoder = GraphDecoder(fast.model, fast.config, capture=capture)
    return ref, fast


def decode_both(ref, fast, tokens) -> bool:
    """Feed tokens one at a time to both; False from the first retrieval tie
    on (after which the engines rightly differ, see first_flip)."""
    for t in tokens:
        seen = len(ref.trace.steps)
        a, c = ref.feed([t]).cpu(), fast.feed([t]).cpu()
        if first_flip(ref, fast, seen) is not None:
            return False
        assert logit_diff(a, c) <= TOL
    return True


def run_and_compare(model, capture: bool):
    ref, fast = pair(model, capture)
    ids = random_ids(300, seed=23)
    assert logit_diff(ref.feed(ids[:200]).cpu(), fast.feed(ids[:200]).cpu()) <= TOL
    steps = []
    real = fast.decoder.step
    fast.decoder.step = lambda t, *rest: steps.append(t) or real(t, *rest)
    if decode_both(ref, fast, ids[200:260]):  # 60 tokens: 45 graph steps, 15 that close a block (eager)
        assert_same_state(ref, fast)
        assert len(steps) == 45
    assert steps, "no step went through the decoder"

    # a snapshot taken between graph steps survives later ones (rollback, as chat does per question)
    mark = fast.snapshot()
    first = [fast.feed([t]).cpu() for t in ids[260:270]]
    fast.rollback(mark)
    again = [fast.feed([t]).cpu() for t in ids[260:270]]
    assert max(logit_diff(x, y) for x, y in zip(first, again)) == 0.0
    fast.rollback(mark)
    if decode_both(ref, fast, ids[260:300]):
        assert_same_state(ref, fast)


def test_fixed_shape_step_equals_the_eager_step():
    run_and_compare(make_tiny_llama(vocab=128, hidden=48, heads=6, kv_heads=2, layers=2, seed=0), capture=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_decoder_records_the_eager_steps_evidence(device):
    """An answer's evidence (attention mass per token of the retrieved and the
    open blocks) is the same whether its tokens ran eagerly or through the
    decoder (eagerly on a CPU, as a captured CUDA graph on a GPU)."""
    model = make_tiny_llama(vocab=128, hidden=48, heads=6, kv_heads=2, layers=2, seed=0).to(device)
    ref, fast = pair(model, capture=device == "cuda")
    ids = random_ids(260, seed=23)
    ref.feed(ids[:200])
    fast.feed(ids[:200])
    ref.record_evidence(EvidenceRecorder())
    fast.record_evidence(EvidenceRecorder())
    if not decode_both(ref, fast, ids[200:260]):
        pytest.skip("a retrieval tie: the engines rightly read different blocks from there on")
    a, c = ref.evidence.result(), fast.evidence.result()
    assert a.rows == c.rows > 0 and torch.allclose(a.mass, c.mass, atol=1e-6) and a.mass.sum() > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_set_top_k_changes_what_decode_retrieves(device):
    """chat's /topk: a new k reaches the next token step on both paths, the
    eager step and the decoder (eagerly on a CPU, a captured CUDA graph on a
    GPU), whose buffers and graph were sized for the old k; both then still
    decode alike."""
    model = make_tiny_llama(vocab=128, hidden=48, heads=6, kv_heads=2, layers=2, seed=0).to(device)
    ref, fast = pair(model, capture=device == "cuda")  # k = 3
    ids = random_ids(240, seed=5)
    ref.feed(ids[:200])
    fast.feed(ids[:200])
    if not decode_both(ref, fast, ids[200:202]):
        pytest.skip("a retrieval tie: the engines rightly read different blocks from there on")
    assert fast.trace.steps[-1].block_ids.shape[-1] == 3
    for e in (ref, fast):
        e.set_top_k(5)
        assert e.config.top_k == 5
    seen, steps = len(fast.trace.steps), []
    real = fast.decoder.step
    fast.decoder.step = lambda t, *rest: steps.append(t) or real(t, *rest)
    decode_both(ref, fast, ids[202:240])  # compares logits up to a retrieval tie, if any
    assert steps, "no step went through the decoder"
    assert all(s.block_ids.shape[-1] == 5 for e in (ref, fast) for s in e.trace.steps[seen:])
    with pytest.raises(ValueError):
        fast.set_top_k(0)


def test_decoder_steps_aside_for_block_closing_and_host_blocks():
    model = make_tiny_llama(vocab=128, hidden=48, heads=6, kv_heads=2, layers=2, seed=0)
    _, fast = pair(model, capture=False)
    fast.feed(random_ids(100, seed=2))
    assert fast.decoder.can_step([5], fast.caches)
    assert not fast.decoder.can_step([5, 127], fast.caches)  # the token closes its block: eager
    fast.move_blocks("cpu")
    assert not fast.decoder.can_step([5], fast.caches)


@pytest.mark.cuda
def test_cuda_graph_step_equals_the_eager_step():
    run_and_compare(make_tiny_llama(vocab=128, hidden=48, heads=6, kv_heads=2, layers=2, seed=0).cuda(), capture=True)
