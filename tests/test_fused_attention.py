"""The fused training kernels (lmqa/train/fused_attention.py) against the
method page's loop reference (forward, float64) and a dense float64 autograd
statement of the same formulas (backward).

Triton picks its interpreter when a kernel is defined, so on a CPU the checks
run in a child process started with TRITON_INTERPRET=1 (as
test_landmark_scoring.py does); on a GPU they also run on CUDA in bfloat16
against the torch training form.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from lmqa.engine.grouped_attention import reference_grouped_attention, sequence_grouped_attention  # noqa: E402
from lmqa.train.fused_attention import fused_sequence_attention, supported  # noqa: E402

from conftest import run_in_triton_interpreter  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRETED, reason="runs in test_in_triton_interpreter's child process")
not_in_child = pytest.mark.skipif(INTERPRETED, reason="not in the interpreter's child process")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@not_in_child
@pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8),
                    reason="older Triton interpreters cannot take a loaded scalar as a loop bound under NumPy 2")
def test_in_triton_interpreter():
    run_in_triton_interpreter(__file__, min_passed=5)


def dense_reference(q, k, v, block_size):
    """The method page's formulas as dense float64 tensor algebra, differentiable:
    per query, an outer softmax over its own visible tokens and the earlier
    landmarks, each landmark's share spread over its block by an inner softmax."""
    B, H, T, d = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(d)  # [B, H, T, T]
    S = block_size + 1
    pos = torch.arange(T)
    blk, is_lm = pos // S, pos % S == block_size
    own = (blk[:, None] == blk[None, :]) & (pos[None, :] <= pos[:, None]) & ~is_lm[None, :]
    earlier_lm = is_lm[None, :] & (blk[None, :] < blk[:, None])  # [T_q, T_k]
    outer = torch.where(own | earlier_lm, s, -math.inf)
    outer_p = torch.softmax(outer, -1)  # own tokens' weights, and each earlier landmark's share
    out = (outer_p * own) @ v
    for mark in pos[is_lm].tolist():
        members = (blk == blk[mark]) & ~is_lm  # the landmark's block's ordinary tokens  # [T_k]
        inner = torch.softmax(torch.where(members, s, -math.inf), -1)  # [B, H, T_q, T_k]
        out = out + outer_p[..., mark : mark + 1] * (inner @ v)
    return out


CASES = [  # B, H, Hkv, T, d, block_size
    (1, 1, 1, 48, 16, 15),  # three whole blocks
    (2, 3, 1, 40, 16, 15),  # grouped-query heads, a trailing partial block (padded)
    (1, 2, 2, 16, 16, 15),  # one block: plain causal attention
    (1, 4, 2, 96, 32, 31),
]


def inputs(B, H, Hkv, T, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(B, Hkv, T, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(B, Hkv, T, d, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]


@in_child
def test_dense_reference_is_the_loop_reference():
    q, k, v = inputs(1, 2, 1, 40, 16, torch.float64)
    lm = torch.arange(40) % 16 == 15
    loop = reference_grouped_attention(q[0].detach(), k[0].detach().repeat_interleave(2, 0),
                                       v[0].detach().repeat_interleave(2, 0), lm)
    assert torch.allclose(dense_reference(q, k, v, 15)[0].detach(), loop, atol=1e-12)


@in_child
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_float64(case):
    B, H, Hkv, T, d, b = case
    q, k, v = inputs(B, H, Hkv, T, d, torch.float64)
    assert supported(q, b)
    out = fused_sequence_attention(q, k, v, b)
    ref = dense_reference(q, k, v, b)
    assert (out - ref).abs().max().item() < 1e-10
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, w in zip("qkv", got, want):
        assert (a - w).abs().max().item() < 1e-9, name


@in_child
def test_inputs_in_transformers_layout():
    """q and v as transformers hands them over ([B, T, H, d] memory, transposed
    views), k contiguous: read in place, the output in q's layout."""
    B, H, Hkv, T, d, b = 1, 2, 1, 48, 16, 15
    q0, k, v0 = inputs(B, H, Hkv, T, d, torch.float64)
    q = q0.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    v = v0.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    out = fused_sequence_attention(q, k, v, b)
    assert out.stride() == q.stride()
    ref = dense_reference(q0, k, v0, b)
    assert (out - ref).abs().max().item() < 1e-10
    grad = torch.randn_like(ref)
    for a, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q0, k, v0), grad)):
        assert (a - w).abs().max().item() < 1e-9


@in_child
def test_unsupported_block_sizes_are_refused():
    q = torch.zeros(1, 1, 16, 16)
    assert not supported(q, 14)  # 15 slots: not a power of two
    assert not supported(q, 7)  # 8 slots: under tl.dot's 16


def test_not_supported_on_plain_cpu():
    if not INTERPRETED:
        assert not supported(torch.zeros(1, 1, 64, 64), 63)


@cuda
@not_in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_the_torch_training_form(dtype):
    """The model's shape (9 query heads over 3 key/value heads, d 64, block 63)."""
    q, k, v = inputs(2, 9, 3, 1000, 64, dtype, device="cuda")
    out = fused_sequence_attention(q, k, v, 63)
    ref = sequence_grouped_attention(*(x.float() for x in (q, k, v)), 63)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.float())
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    assert (out.float() - ref).abs().max().item() < tol
    for name, a, w in zip("qkv", got, want):
        err = ((a.float() - w).norm() / w.norm()).item()
        assert err < tol, (name, err)
