"""Fused landmark scoring (lmqa/engine/landmark_scoring.py) against the plain
form of the block-scoring rule it stands in for on CUDA (retrieval.block_probs),
on CPU through Triton's interpreter.

Triton picks the interpreter or the compiler when a kernel is defined, its
own library's (tl.max, tl.sum, ...) included, that is on import. So in a
normal run the CPU checks are one test, which runs this module again in a
child process with TRITON_INTERPRET=1 set from the start; on a GPU the same
checks also run here on CUDA tensors through the compiled kernels.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from lmqa.engine import landmark_scoring, retrieval  # noqa: E402
from lmqa.engine.landmark_engine import LandmarkEngine  # noqa: E402
from lmqa.engine.landmarks import LandmarkConfig  # noqa: E402
from lmqa.engine.retrieval import top_blocks  # noqa: E402

from conftest import make_tiny_llama, run_in_triton_interpreter  # noqa: E402

# interpreter-sized tiles (tl.dot's smallest); the GPU defaults would make each program a large numpy op
SMALL = landmark_scoring.Tiles(rows=16, blocks=16, warps=4, stages=1)
# limit 0 numpy-warns in log2(0) = -inf, which is the intended result
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_triton_interpreter's child process")
not_in_child = pytest.mark.skipif(INTERPRETED, reason="not in the interpreter's child process")
# CPU tensors through the interpreter (in the child), CUDA ones through compiled kernels (on a GPU)
DEVICES = [pytest.param("cpu", marks=in_child), pytest.param("cuda", marks=[pytest.mark.cuda, not_in_child])]


@not_in_child
@pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8),
                    reason="older Triton interpreters cannot take a loaded scalar as a loop bound under NumPy 2")
def test_in_triton_interpreter():
    run_in_triton_interpreter(__file__, min_passed=10)


def test_not_used_on_cpu():
    assert not landmark_scoring.usable(torch.zeros(1, 1, 1, 64))


def _widen(x):
    """A bf16 interpreter tensor (raw bits in uint16) as float32."""
    if x.dtype != tl.bfloat16 or x.data.dtype != np.uint16:
        return x
    return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


@pytest.fixture
def bf16_dots(monkeypatch):
    """Triton 3.8's interpreter multiplies bf16 operands' raw bits: widen them first."""
    if INTERPRETED:
        dot = interpreter.InterpreterBuilder.create_dot
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                            lambda self, a, b, *rest: dot(self, _widen(a), _widen(b), *rest))


def random_case(B, Hkv, G, W, d, n_old, k, limits, dtype, seed):
    """Inputs as select_blocks' batched form makes them: limits [B] (0 included), each
    chunk's own rows a window [open, len) of its W rows in each of the G
    groups (none for a chunk with nothing before it), the first recent
    landmarks missing where a chunk has fewer than k blocks before it."""
    g = torch.Generator().manual_seed(seed)
    qg = (torch.randn(B, Hkv, G * W, d, generator=g) * 1.5).to(dtype)  # [B, Hkv, G*W, d]
    lm_old = torch.randn(Hkv, n_old, d, generator=g).to(dtype)
    lm_recent = torch.randn(B, Hkv, k, d, generator=g).to(dtype)
    s_recent = qg @ lm_recent.transpose(-1, -2)  # [B, Hkv, G*W, k]
    LM_RECENT[id(s_recent)] = lm_recent
    old_limit = torch.tensor(limits)
    before = old_limit + torch.tensor([(b * 5) % (k + 1) if lim == 0 else k for b, lim in enumerate(limits)])
    recent_missing = torch.arange(k) < (k - before.clamp(max=k))[:, None]  # [B, k]
    w = torch.arange(W)
    opens = torch.randint(0, W // 3, (B,), generator=g)
    lens = W - torch.randint(0, W // 3, (B,), generator=g)
    own = (w >= opens[:, None]) & (w < lens[:, None]) & (before[:, None] > 0)  # [B, W]
    rows = own[:, None].expand(-1, G, -1).reshape(B, 1, G * W)
    return qg, lm_old, s_recent, old_limit, recent_missing, rows


LM_RECENT = {}  # random_case's recent landmark keys, by its s_recent


def plain(qg, lm_old, s_recent, old_limit, recent_missing, rows, scale):
    """The plain form (retrieval.block_probs on both parts), as logarithms like best_rows'."""
    assert scale == qg.shape[-1] ** 0.5
    too_old = torch.arange(lm_old.shape[1], device=qg.device) >= old_limit[:, None]
    probs = retrieval.block_probs(qg, [lm_old, LM_RECENT[id(s_recent)]],
                                  [too_old[:, None, None], recent_missing[:, None, None]], rows[..., None])
    return tuple(p.log() for p in probs)


def fused(device, case, scale):
    """best_rows on case's tensors moved to device: interpreter-sized tiles on CPU, the defaults on CUDA."""
    case = [t.to(device) for t in case]
    tiles = (SMALL, SMALL) if device == "cpu" else ()
    return landmark_scoring.best_rows(case[0], case[1], case[2].clone(), *case[3:], scale, *tiles)


def assert_same_choice(got, want, k, margin):
    """top_blocks picks the same blocks wherever the plain scores' k-th and
    (k+1)-th best are more than margin apart."""
    ids_got, _ = top_blocks(got, k)
    ids_want, _ = top_blocks(want, k)
    top = want.sort(dim=-1, descending=True).values
    clear = (top[..., k - 1] - top[..., k] > margin) | (top[..., k - 1] == float("-inf"))  # [B, Hkv]
    assert clear.any()  # the check means something
    assert torch.equal(ids_got[clear], ids_want[clear])


# (B, Hkv, G, W, d, n_old, k, limits): n_old off the tile size, limits 0, partial and whole
SHAPES = [(4, 2, 3, 20, 64, 50, 3, [0, 0, 17, 50]),
          (3, 1, 3, 11, 64, 37, 2, [5, 16, 37]),
          (2, 3, 1, 24, 32, 16, 4, [16, 1])]
TOLERANCE = {torch.float32: (1e-4, 1e-4, 1e-3), torch.float16: (5e-3, 1e-3, 0.05),
             torch.bfloat16: (5e-2, 1e-2, 0.3)}  # atol, rtol, top-k margin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-n{s[5]}")
def test_fused_equals_plain(bf16_dots, device, shape, dtype):
    *dims, limits = shape
    d, k = dims[4], dims[6]
    case = random_case(*dims, limits, dtype, seed=sum(dims))
    want_old, want_recent = plain(*case, d**0.5)
    got_old, got_recent = (t.cpu() for t in fused(device, case, d**0.5))
    atol, rtol, margin = TOLERANCE[dtype]
    assert got_old.dtype == torch.float32 and got_old.shape == want_old.shape
    # -inf exactly where the plain path has it (blocks past the limit, chunks without rows)
    torch.testing.assert_close(got_old, want_old, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_recent, want_recent, atol=atol, rtol=rtol)
    assert_same_choice(torch.cat([got_old, got_recent], -1), torch.cat([want_old, want_recent], -1), k, margin)


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_tiles_and_nothing_stored(bf16_dots, dtype):
    """The default (GPU) tile shapes for 16-bit and float32 inputs on one small case, and n_old = 0."""
    case = random_case(2, 1, 3, 30, 64, 140, 2, [140, 9], dtype, seed=1)
    want = plain(*case, 8.0)
    got = landmark_scoring.best_rows(*case[:2], case[2].clone(), *case[3:], 8.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][1])
    case = random_case(2, 1, 3, 30, 64, 0, 2, [0, 0], torch.float32, seed=2)
    got, want = fused("cpu", case, 8.0), plain(*case, 8.0)
    assert got[0].shape == (2, 1, 0)
    torch.testing.assert_close(got[1], want[1])


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_first_use_check(bf16_dots, monkeypatch, dtype):
    """usable()'s one-time check passes the kernels as they are and turns the
    fused path off, with a warning, when they give a wrong result."""
    check = retrieval._fused_checked.__wrapped__  # uncached
    assert check(torch.device("cpu"), dtype, 64)
    best = landmark_scoring.old_best
    monkeypatch.setattr(landmark_scoring, "old_best", lambda *a: best(*a) + 0.5)  # probabilities 1.6x too high
    with pytest.warns(UserWarning, match="fused landmark scoring unavailable"):
        assert not check(torch.device("cpu"), dtype, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_select_batched_fused_equals_plain(bf16_dots, monkeypatch, device):
    """The whole layer-major prefill with the fused scoring (on CPU: forced
    on, as on CUDA) retrieves the same blocks and gives the same logits as
    with the plain path; also with one chunk per batch."""
    vocab, landmark = 128, 127
    model = make_tiny_llama(vocab=vocab, hidden=96, heads=6, kv_heads=2, layers=2, seed=3).to(device)  # G 3, d 16
    ids = torch.randint(0, landmark, (170,), generator=torch.Generator().manual_seed(5)).tolist()
    cfg = LandmarkConfig(landmark_id=landmark, block_size=4, top_k=3, train_context=4096, chunk_size=15)

    def run(score_elements=None):
        engine = LandmarkEngine(model, cfg, prefill="layer")
        budget = engine.prefill_budget
        engine.prefill_budget = dataclasses.replace(budget, batched_scoring=True, compile=False,
                                                    score_elements=score_elements or budget.score_elements)
        return engine.feed(ids).cpu(), engine

    monkeypatch.setattr(landmark_scoring, "ENABLED", False)
    plain_logits, plain_engine = run()
    monkeypatch.setattr(landmark_scoring, "ENABLED", True)
    calls = []
    best_rows = landmark_scoring.best_rows
    tiles = (SMALL, SMALL) if device == "cpu" else ()
    if device == "cpu":
        monkeypatch.setattr(landmark_scoring, "usable", lambda qg: True)
    monkeypatch.setattr(landmark_scoring, "best_rows", lambda *a: calls.append(1) or best_rows(*a, *tiles))
    for score_elements in (None, 1):
        calls.clear()
        logits, engine = run(score_elements)
        assert calls and (score_elements is None or len(calls) > 2)
        torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)
        assert len(engine.trace.steps) == len(plain_engine.trace.steps)
        for a, b in zip(engine.trace.steps, plain_engine.trace.steps):
            assert torch.equal(a.block_ids.cpu(), b.block_ids.cpu()), a.position
            torch.testing.assert_close(a.scores.cpu(), b.scores.cpu(), atol=1e-5, rtol=1e-4)
