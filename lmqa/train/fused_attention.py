"""Fused training form of the grouped softmax (method page, section 2): Triton
forward and backward kernels, FlashAttention-style.

Why: the plain form (engine/grouped_attention.py) writes a [queries x keys]
score tensor per layer; untiled it does not fit an 80 GB card at batch 16 x
2048, and tiled and checkpointed it trains at a sixth of SDPA's speed. Here the
scores live only in on-chip tiles.

The layout makes a fused kernel simple: every landmark block is S = b + 1
slots (the last one its landmark), and one key tile is exactly one block. For a
query row i in block g, block h contributes its inner softmax's output
o_ih = sum_j p_ij v_j, with an outer logit c_ih: the landmark's score if h < g,
the log-sum-exp of the visible own-block scores if h == g. The output is
sum_h softmax_h(c_ih) o_ih, accumulated block by block with an online softmax
over the c's, as FlashAttention accumulates over key tiles.

Backward, with w_ij = P_ih p_ij the weight of token j (P the outer softmax),
D_i = dO_i . O_i and E_ih = dO_i . o_ih:
  * dV_j = sum_i w_ij dO_i;
  * an earlier block's token: ds_ij = w_ij (dO_i . v_j - E_ih); its landmark:
    ds_iL = P_ih (E_ih - D_i);
  * an own-block token: ds_ij = w_ij (dO_i . v_j - D_i) (plain attention's rule,
    since c_ig is the log-sum-exp of those same scores).
Each tile recomputes its block's inner softmax whole, so only the outer
log-sum-exp per row is saved. dK/dV and dQ are two kernels (no atomics).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton (or a broken one): the tiled torch form serves
    triton = None

LOG2_E = 1.0 / math.log(2.0)


def supported(q: torch.Tensor, block_size: int) -> bool:
    """Whether fused_sequence_attention can run these inputs: Triton on a CUDA
    tensor (or in its interpreter), a block of S = b + 1 slots that is a power of
    two of at least 16 (one tl.dot tile), and a head size tl.dot takes."""
    S, d = block_size + 1, q.shape[-1]
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (triton is not None and on_device and S >= 16 and S & (S - 1) == 0
            and d >= 16 and d & (d - 1) == 0)


def supported_by(model, block_size: int) -> bool:
    """supported() for a loaded LlamaForCausalLM on its device."""
    return supported(torch.zeros(1, 1, 1, model.config.head_dim, device=model.device), block_size)


if triton is not None:

    @triton.jit
    def _inner(q, k, own, scale, S: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        """One key block seen from one query block: the inner softmax
        (normalised) and the block's outer logit, in base-2 units (scale
        carries log2(e) / sqrt(d))."""
        cols = tl.arange(0, S)
        rows = tl.arange(0, S)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC) * scale  # [S_q, S_k]
        is_lm = cols[None, :] == S - 1
        hidden = is_lm | (own & (cols[None, :] > rows[:, None]))
        s_in = tl.where(hidden, float("-inf"), s)
        m = tl.max(s_in, 1)
        p = tl.exp2(s_in - m[:, None])
        l = tl.sum(p, 1)
        p = p / l[:, None]
        landmark = tl.sum(tl.where(is_lm, s, 0.0), 1)
        gate = tl.where(own, m + tl.log2(l), landmark)
        return p, gate

    def _tuned(kernel):
        """Warps and pipeline stages chosen per (S, D) by timing on first use
        (a few seconds); the interpreter takes the first configuration."""
        if os.environ.get("TRITON_INTERPRET") == "1":
            return triton.jit(kernel)
        configs = [triton.Config({}, num_warps=w, num_stages=n) for w in (4, 8) for n in (2, 3)]
        return triton.autotune(configs, key=["S", "D"])(triton.jit(kernel))

    @triton.jit
    def _block(b, h, sb, sh, st, blk, S: tl.constexpr, D: tl.constexpr):
        """Offsets of block blk's S positions x D of head h in batch b."""
        return b * sb + h * sh + (blk * S + tl.arange(0, S))[:, None] * st + tl.arange(0, D)[None, :]

    @_tuned
    def _fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                    H, GROUP, scale, S: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        g, bh = tl.program_id(0), tl.program_id(1)  # query block, (batch, head)
        b, h = bh // H, bh % H
        qoffs = _block(b, h, sqb, sqh, sqt, g, S, D)
        q = tl.load(Q + qoffs)
        m_o = tl.full([S], float("-inf"), ACC)
        l_o = tl.zeros([S], ACC)
        acc = tl.zeros([S, D], ACC)
        for blk in range(0, g + 1):
            k = tl.load(K + _block(b, h // GROUP, skb, skh, skt, blk, S, D))
            v = tl.load(V + _block(b, h // GROUP, svb, svh, svt, blk, S, D))
            p, gate = _inner(q, k, blk == g, scale, S, ACC, PREC)
            o_blk = tl.dot(p.to(v.dtype), v, out_dtype=ACC, input_precision=PREC)
            m_new = tl.maximum(m_o, gate)
            alpha = tl.exp2(m_o - m_new)
            beta = tl.exp2(gate - m_new)
            acc = acc * alpha[:, None] + o_blk * beta[:, None]
            l_o = l_o * alpha + beta
            m_o = m_new
        tl.store(O + qoffs, (acc / l_o[:, None]).to(O.dtype.element_ty))
        tl.store(LSE + (bh * tl.num_programs(0) + g) * S + tl.arange(0, S), m_o + tl.log2(l_o))

    @triton.jit
    def _block_grads(q, k, v, do, lse, delta, own, scale, S: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        """The token weights w and score gradients ds (natural units) of one key
        block for one query block (module docstring's backward)."""
        cols = tl.arange(0, S)
        p, gate = _inner(q, k, own, scale, S, ACC, PREC)
        outer = tl.exp2(gate - lse)  # P_ih
        w = p * outer[:, None]
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)  # dO_i . v_j
        e = tl.sum(p * dp, 1)  # E_ih
        ds = w * (dp - tl.where(own, delta, e)[:, None])
        is_lm = cols[None, :] == S - 1
        lm_grad = tl.where(own, 0.0, outer * (e - delta))
        ds = tl.where(is_lm, lm_grad[:, None], ds)
        return w, ds

    @_tuned
    def _bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                       H, HKV, GROUP, NB, scale, sm_scale, S: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        blk, bh = tl.program_id(0), tl.program_id(1)  # key block, (batch, key/value head)
        b, hk = bh // HKV, bh % HKV
        koffs = _block(b, hk, skb, skh, skt, blk, S, D)
        voffs = _block(b, hk, svb, svh, svt, blk, S, D)
        k = tl.load(K + koffs)
        v = tl.load(V + voffs)
        dk = tl.zeros([S, D], ACC)
        dv = tl.zeros([S, D], ACC)
        for j in range(0, GROUP):
            h = hk * GROUP + j
            for g in range(blk, NB):
                qoffs = _block(b, h, sqb, sqh, sqt, g, S, D)
                q = tl.load(Q + qoffs)
                do = tl.load(DO + qoffs)
                row = ((b * H + h) * NB + g) * S + tl.arange(0, S)
                w, ds = _block_grads(q, k, v, do, tl.load(LSE + row), tl.load(DELTA + row), g == blk, scale, S, ACC, PREC)
                dv += tl.dot(tl.trans(w.to(do.dtype)), do, out_dtype=ACC, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, out_dtype=ACC, input_precision=PREC)
        tl.store(DK + koffs, (dk * sm_scale).to(DK.dtype.element_ty))
        tl.store(DV + voffs, dv.to(DV.dtype.element_ty))

    @_tuned
    def _bwd_q_kernel(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                      H, GROUP, NB, scale, sm_scale, S: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
        g, bh = tl.program_id(0), tl.program_id(1)  # query block, (batch, head)
        b, h = bh // H, bh % H
        qoffs = _block(b, h, sqb, sqh, sqt, g, S, D)
        q = tl.load(Q + qoffs)
        do = tl.load(DO + qoffs)
        row = (bh * NB + g) * S + tl.arange(0, S)
        lse = tl.load(LSE + row)
        delta = tl.load(DELTA + row)
        dq = tl.zeros([S, D], ACC)
        for blk in range(0, g + 1):
            k = tl.load(K + _block(b, h // GROUP, skb, skh, skt, blk, S, D))
            v = tl.load(V + _block(b, h // GROUP, svb, svh, svt, blk, S, D))
            w, ds = _block_grads(q, k, v, do, lse, delta, blk == g, scale, S, ACC, PREC)
            dq += tl.dot(ds.to(k.dtype), k, out_dtype=ACC, input_precision=PREC)
        tl.store(DQ + qoffs, (dq * sm_scale).to(DQ.dtype.element_ty))


def _acc_dtype(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _precision(x: torch.Tensor) -> str:
    """float32 inputs multiply in full precision (tl.dot's default on Hopper is TF32)."""
    return "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"


def _strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """Batch, head and position strides of q (and of o, do, dq: same layout), k and v."""
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])


class _FusedGroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, S: int):
        B, H, T, d = q.shape
        Hkv = k.shape[1]
        NB = T // S
        o = torch.empty_like(q)  # q's layout (often [B, T, H, d] in memory, so the caller's transpose is free)
        lse = torch.empty(B * H * T, device=q.device, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
        scale = LOG2_E / math.sqrt(d)
        _fwd_kernel[(NB, B * H)](q, k, v, o, lse, *_strides(q, k, v), H, H // Hkv, scale, S=S, D=d,
                                 ACC=_acc_dtype(q), PREC=_precision(q))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.S = S
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        S = ctx.S
        B, H, T, d = q.shape
        Hkv = k.shape[1]
        NB = T // S
        if do.stride() != q.stride():
            do = torch.empty_like(q).copy_(do)
        delta = (do.to(lse.dtype) * o.to(lse.dtype)).sum(-1).reshape(-1)  # D_i = dO_i . O_i  # [B*H*T]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scale, sm_scale = LOG2_E / math.sqrt(d), 1.0 / math.sqrt(d)
        strides, kinds = _strides(q, k, v), dict(S=S, D=d, ACC=_acc_dtype(q), PREC=_precision(q))
        _bwd_kv_kernel[(NB, B * Hkv)](q, k, v, do, lse, delta, dk, dv, *strides, H, Hkv, H // Hkv, NB,
                                      scale, sm_scale, **kinds)
        _bwd_q_kernel[(NB, B * H)](q, k, v, do, lse, delta, dq, *strides, H, H // Hkv, NB, scale, sm_scale, **kinds)
        return dq, dk, dv, None


def fused_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    """sequence_grouped_attention (engine/grouped_attention.py) through the fused
    kernels: the whole sequence with a landmark at every (b+1)-th slot.

    q: [B, H, T, d]; k, v: [B, Hkv, T, d] (rotated); differentiable. A trailing
    partial block is padded: causality hides the padding from every real query.
    """
    S = block_size + 1
    T = q.shape[2]
    pad = -T % S
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = _FusedGroupedAttention.apply(q, k, v, S)
    return out[:, :, :T] if pad else out
