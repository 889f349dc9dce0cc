"""Grouped softmax (method page, section 2) against the slow loop reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmqa.engine.grouped_attention import (
    blockwise_grouped_attention,
    grouped_attention,
    grouped_attention_inference,
    last_block_attention,
    reference_grouped_attention,
    sequence_grouped_attention,
)

TOL = 1e-5


def rand_qkv(H, Hkv, T, d, seed=0, scale=1.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, d, generator=g, dtype=dtype) * scale
    k = torch.randn(1, Hkv, T, d, generator=g, dtype=dtype) * scale
    v = torch.randn(1, Hkv, T, d, generator=g, dtype=dtype)
    return q, k, v


def landmark_mask(T, b):
    return torch.arange(T) % (b + 1) == b


def reference(q, k, v, is_landmark):
    """The loop reference, with kv heads repeated for grouped-query attention."""
    group = q.shape[1] // k.shape[1]
    kr = k[0].repeat_interleave(group, dim=0)
    vr = v[0].repeat_interleave(group, dim=0)
    return reference_grouped_attention(q[0], kr, vr, is_landmark).float()


# (block_size b, sequence length T, query heads H, kv heads Hkv, head dim d)
LAYOUTS = [
    (3, 13, 2, 2, 8),  # 3 full blocks + a partial one
    (4, 23, 4, 2, 8),  # GQA 2:1, T not a multiple of b+1
    (7, 16, 4, 1, 16),  # multi-query, T = 2 * (b + 1): ends on a landmark
    (1, 9, 2, 1, 4),  # b = 1: every other position is a landmark
    (5, 6, 2, 2, 8),  # one block exactly, its landmark is the last query
    (2, 31, 6, 3, 4),  # many small blocks, GQA 2:1
    (6, 4, 2, 1, 8),  # shorter than one block: no landmark at all
]


@pytest.mark.parametrize("b,T,H,Hkv,d", LAYOUTS)
def test_training_form_matches_loop_reference(b, T, H, Hkv, d):
    q, k, v = rand_qkv(H, Hkv, T, d, seed=b * 100 + T)
    got = sequence_grouped_attention(q, k, v, b)[0]
    want = reference(q, k, v, landmark_mask(T, b))
    assert got.shape == (H, T, d)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("tile", [1, 2, 3])
@pytest.mark.parametrize("b,T,H,Hkv,d", [LAYOUTS[1], LAYOUTS[2], LAYOUTS[5]])
def test_tiled_training_form_matches_loop_reference(b, T, H, Hkv, d, tile):
    """The memory-efficient blockwise training form (tile query blocks at a time)."""
    q, k, v = rand_qkv(H, Hkv, T, d, seed=b * 100 + T)
    got = sequence_grouped_attention(q, k, v, b, tile=tile)[0]
    assert (got - reference(q, k, v, landmark_mask(T, b))).abs().max().item() <= TOL


def test_tiled_training_gradients_match_one_pass():
    """Checkpointed tiles give the same gradients as the one-pass form."""
    b, T = 3, 27
    grads = {}
    for tile in (None, 2):
        q, k, v = rand_qkv(4, 2, T, 8, seed=2)
        for t in (q, k, v):
            t.requires_grad_(True)
        out = sequence_grouped_attention(q, k, v, b, tile=tile)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[tile] = (q.grad, k.grad, v.grad)
    for a, c in zip(grads[None], grads[2]):
        assert (a - c).abs().max().item() <= 1e-5
        assert a.abs().sum() > 0


@pytest.mark.parametrize("b,T,H,Hkv", [(4, 4, 4, 2), (8, 5, 4, 4), (16, 16, 2, 1), (3, 1, 2, 2)])
def test_without_landmark_equals_causal_softmax(b, T, H, Hkv):
    """T <= b: one open block, no landmark, so plain causal attention."""
    q, k, v = rand_qkv(H, Hkv, T, 8, seed=T)
    got = sequence_grouped_attention(q, k, v, b)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                          is_causal=True)
    assert (got - want).abs().max().item() <= TOL


def test_with_landmarks_differs_from_causal_softmax():
    """Sanity for the test above: once a landmark exists, the result is not plain causal attention."""
    q, k, v = rand_qkv(2, 2, 12, 8)
    got = sequence_grouped_attention(q, k, v, 3)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (got - plain).abs().max().item() > 1e-2


def test_landmark_values_carry_no_mass():
    """Landmark slots hold no value: changing their values changes nothing."""
    b, T = 4, 22
    q, k, v = rand_qkv(4, 2, T, 8)
    v2 = v.clone()
    v2[:, :, landmark_mask(T, b)] = 1e3
    assert torch.equal(sequence_grouped_attention(q, k, v, b), sequence_grouped_attention(q, k, v2, b))


def test_landmark_keys_do_matter():
    """...but their keys decide each block's share."""
    b, T = 4, 22
    q, k, v = rand_qkv(4, 2, T, 8)
    k2 = k.clone()
    k2[:, :, landmark_mask(T, b)] += 2.0
    assert (sequence_grouped_attention(q, k, v, b) - sequence_grouped_attention(q, k2, v, b)).abs().max() > 1e-3


def _inference_layout(b, r, T_window, p, H, Hkv, d, seed):
    """r retrieved blocks followed by a window (p open-block tokens + new tokens).

    Returns the block-laid-out tensors for grouped_attention and the flat
    sequence (with its landmark mask) for the reference.
    """
    S = b + 1
    W = p + T_window
    n_win = -(-W // S)
    flat_len = r * S + W
    q, k, v = rand_qkv(H, Hkv, flat_len, d, seed=seed)
    is_lm = landmark_mask(flat_len, b)
    pad = (r + n_win) * S - flat_len
    kb = F.pad(k, (0, 0, 0, pad)).unflatten(2, (r + n_win, S))
    vb = F.pad(v, (0, 0, 0, pad)).unflatten(2, (r + n_win, S))
    valid = (torch.arange((r + n_win) * S) < flat_len).view(r + n_win, S)
    q_idx = torch.arange(p, W)
    q_rows = r * S + q_idx  # rows of the flat sequence that are queries
    return q[:, :, q_rows], kb, vb, r + q_idx // S, q_idx % S, valid, (q, k, v, is_lm, q_rows)


@pytest.mark.parametrize("b,r,T_window,p,H,Hkv", [(3, 2, 9, 0, 4, 2), (4, 3, 7, 2, 2, 2), (5, 1, 1, 3, 4, 1),
                                                  (2, 4, 1, 1, 2, 1), (4, 0, 10, 0, 2, 2), (3, 3, 4, 3, 4, 2)])
@pytest.mark.parametrize("form", [grouped_attention, grouped_attention_inference])
def test_inference_form_matches_reference(b, r, T_window, p, H, Hkv, form):
    """Retrieved blocks + window (queries only in the window), the engine's layout;
    both the differentiable form and the engine's in-place one."""
    q, kb, vb, q_block, q_offset, valid, (qf, kf, vf, is_lm, rows) = _inference_layout(b, r, T_window, p, H, Hkv, 8, seed=r + p)
    got = form(q, kb, vb, q_block, q_offset, valid)[0]
    want = reference(qf, kf, vf, is_lm)[:, rows]
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("tile", [1, 2, 3, 7])
def test_blockwise_equals_one_pass(tile):
    q, kb, vb, q_block, q_offset, valid, _ = _inference_layout(3, 2, 17, 1, 4, 2, 8, seed=5)
    one = grouped_attention(q, kb, vb, q_block, q_offset, valid)
    tiled = blockwise_grouped_attention(q, kb, vb, q_block, q_offset, valid, tile=tile)  # no grad: the in-place form
    assert (one - tiled).abs().max().item() <= 1e-6


@pytest.mark.parametrize("tile", [None, 2])
def test_batch_and_3_to_1_gqa_match_float64_loop_reference(tile):
    """Batch 3, 9 query heads on 3 kv heads (the default model's 3:1 layout),
    a padded last block: every sequence of the batch against the loop
    reference in float64 (the form computes its scores in float32)."""
    b, T, H, Hkv, d, batch = 4, 23, 9, 3, 8, 3
    g = torch.Generator().manual_seed(14)
    q = torch.randn(batch, H, T, d, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(batch, Hkv, T, d, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(batch, Hkv, T, d, generator=g, dtype=torch.float64)
    got = sequence_grouped_attention(q.float(), k.float(), v.float(), b, tile=tile)
    assert got.shape == (batch, H, T, d)
    for i in range(batch):
        want = reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], landmark_mask(T, b))
        assert (got[i] - want).abs().max().item() <= TOL, i
    assert (got[1] - got[0]).abs().max() > 0.1  # each sequence its own keys, not batch 0 broadcast


def test_gqa_head_order_matches_hf_repeat_kv():
    """Query head h uses kv head h // group (transformers' repeat_kv), not h % Hkv."""
    b, T, H, Hkv = 3, 11, 4, 2
    q, k, v = rand_qkv(H, Hkv, T, 8)
    got = sequence_grouped_attention(q, k, v, b)[0]
    wrong = reference_grouped_attention(q[0], k[0].repeat(H // Hkv, 1, 1), v[0].repeat(H // Hkv, 1, 1),
                                        landmark_mask(T, b)).float()
    assert (got - wrong).abs().max().item() > 1e-2


def test_training_form_gradcheck():
    """The training form is differentiable; analytic gradients match finite differences.

    Scores are computed in fp32 inside, so the check uses a wide eps.
    """
    b, T = 2, 8
    q, k, v = rand_qkv(2, 1, T, 4, seed=3, scale=0.8, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k, v: sequence_grouped_attention(q, k, v, b), (q, k, v),
                                    eps=1e-3, atol=2e-3, rtol=1e-2)


def test_training_form_gradients_finite_with_peaked_scores():
    """Large scores and padded (masked) slots must not give inf/NaN gradients."""
    b, T = 4, 23  # padded trailing block
    q, k, v = rand_qkv(4, 2, T, 8, seed=1, scale=8.0)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = sequence_grouped_attention(q, k, v, b)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0
    # keys of earlier blocks get gradient (the inner softmax is differentiated too)
    assert k.grad[:, :, :b].abs().sum() > 0


@pytest.mark.parametrize("tile", [None, 2])
def test_training_form_through_hf_model_backward(tiny_llama, tile):
    """A loss through a tiny LLaMA with the landmark attention function backpropagates to every weight."""
    from lmqa.train.attention_interface import use_landmark_attention
    from lmqa.engine.landmarks import insert_landmarks

    model = tiny_llama(vocab=64).train()
    use_landmark_attention(model, 4, tile=tile)
    ids = torch.tensor([insert_landmarks(torch.randint(0, 63, (30,), generator=torch.Generator().manual_seed(0)), 4, 63)])
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _last_block_tile(b, r, T_window, p, H, Hkv, d, seed):
    """The queries of the window's last block only, with the keys up to it (a
    one-block prefill tile)."""
    q, kb, vb, q_block, q_offset, valid, _ = _inference_layout(b, r, T_window, p, H, Hkv, d, seed)
    last = q_block == q_block[-1]
    n = int(q_block[-1]) + 1
    return q[:, :, last], kb[:, :, :n], vb[:, :, :n], q_block[last], q_offset[last], valid[:n]


@pytest.mark.parametrize("b,r,T_window,p,H,Hkv", [(3, 2, 9, 0, 4, 2), (4, 3, 7, 2, 2, 2), (5, 1, 1, 3, 4, 1),
                                                  (4, 0, 10, 0, 2, 2), (7, 3, 30, 5, 9, 3)])
def test_last_block_attention_equals_the_inference_form(b, r, T_window, p, H, Hkv):
    """In float32 it is the inference form for one query block; in bfloat16 it
    stays within bfloat16 rounding of it."""
    q, k, v, q_block, q_offset, valid = _last_block_tile(b, r, T_window, p, H, Hkv, 16, seed=b + r)
    want = grouped_attention_inference(q, k, v, q_block, q_offset, valid)
    assert (last_block_attention(q, k, v, q_offset, torch.float32) - want).abs().max().item() <= TOL
    half = last_block_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_offset, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert (half.float() - want).abs().max().item() <= 0.05 * want.abs().max().item()
