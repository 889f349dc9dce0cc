"""Fused landmark scoring: the CUDA dispatch of the block-scoring rule
(retrieval.block_probs) for batches of chunks.

Why: retrieval.select_blocks' batched form scores every chunk's query rows
against every landmark stored before it. The plain form writes those scores
as one tensor [B, Hkv, G*W, n_old] (B chunks, Hkv key/value heads, G query
heads per key/value head, W window rows, n_old blocks older than each
chunk's k most recent, all at slot 0) and reads it back for a softmax over
blocks and a max over rows. At a million tokens (16k blocks, ~5000 rows per chunk and key/value head) that is ~160 MB
of bf16 per chunk and head, written and read twice at every layer: memory
traffic, not arithmetic, bounds the prefill. Here two Triton kernels recompute the dot products
instead of storing them (the FlashAttention trade):

  pass 1 (_lse_kernel): per (chunk, head, row), the logsumexp over the
    chunk's blocks g < old_limit[b] of q . lm_g / sqrt(d), an online
    max/sum over block tiles in float32 (exp2/log2 on log2(e)-scaled scores);
  in torch (with_recent): log-add the few recent landmarks' part and set
    rows that are not the chunk's own queries to +inf;
  pass 2 (_best_kernel): per (chunk, head, block tile), the max over row
    tiles of q . lm_g / sqrt(d) - lse[row]; blocks at or past old_limit[b]
    get -inf.

Each dot product is rounded to the inputs' dtype before use, as the plain
path's matmul output is (a no-op for float32; ROUND_SCORES), so both paths
score alike and pick the same blocks but for near-ties. best_rows returns the
logarithm of what block_probs returns for the two parts (old, recent);
usable() says when select_blocks may call it (CUDA, Triton importable, a head
size tl.dot takes); select_blocks checks a first small call against the
plain form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .grouped_attention import LOG2_E

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton (or a broken one): the plain path serves
    triton = None

# Set False to make select_blocks take the plain (reference) form everywhere.
ENABLED = True
# Round each dot product to the inputs' dtype, as the plain path's matmul
# output is (two conversions per score; False: float32 scores, a little
# faster and more exact, but near-ties may then go the other way).
ROUND_SCORES = True


class Tiles(NamedTuple):
    """One kernel's launch shape: rows and blocks per tile, warps, pipeline stages."""

    rows: int
    blocks: int
    warps: int
    stages: int


# Pass 1 holds a row tile and streams block tiles; pass 2 holds a block tile
# and streams row tiles. For 16-bit inputs, then float32 ones, whose exact
# (FMA, not tensor core) dot spills registers at the 16-bit tile sizes.
LSE_TILES = (Tiles(rows=128, blocks=64, warps=8, stages=3), Tiles(rows=64, blocks=32, warps=4, stages=2))
BEST_TILES = (Tiles(rows=64, blocks=128, warps=8, stages=3), Tiles(rows=32, blocks=64, warps=4, stages=2))

if triton is not None:

    @triton.jit
    def _as_matmul_output(s, dtype: tl.constexpr, ROUND: tl.constexpr):
        """float32 s rounded to dtype and back, as a 16-bit matmul's output is.
        ROUND 0: as is; 1: by .to (the interpreter); 2: two at a time by
        packed conversions (CUDA: the scalar conversion runs at the rate of
        exp2, 16 a cycle per SM, and would halve the kernels' speed)."""
        if ROUND == 1:
            s = s.to(dtype).to(tl.float32)
        elif ROUND == 2:
            if dtype == tl.bfloat16:  # a bf16 is a float32's upper half
                s = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
                    "=r,=r,r,r", [s], dtype=tl.float32, is_pure=True, pack=2)
            else:
                s = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; .reg .b16 lo, hi; cvt.rn.f16x2.f32 t, $3, $2; mov.b32 {lo, hi}, t; "
                    "cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
                    "=r,=r,r,r", [s], dtype=tl.float32, is_pure=True, pack=2)
        return s

    # Sizes and the small tensors' strides are not specialized on (their
    # divisibility would only cost recompiles as they change between batches).
    @triton.jit(do_not_specialize=["R", "se_b", "se_h"])
    def _lse_kernel(q_ptr, lm_ptr, limit_ptr, lse_ptr, R, scale2,
                    sq_b, sq_h, sq_r, sl_h, sl_g, se_b, se_h,
                    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, IEEE: tl.constexpr,
                    ROUND: tl.constexpr):
        """lse[b, h, r] = ln sum_{g < limit[b]} exp(q[b, h, r] . lm[h, g] / sqrt(d)); scale2 = log2(e) / sqrt(d).
        IEEE: float32 inputs, multiplied as such (no TF32); ROUND: see _as_matmul_output."""
        r_tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        dims = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_r + dims[None, :], mask=rows[:, None] < R,
                    other=0.0)  # [BLOCK_R, D]
        limit = tl.load(limit_ptr + b)
        lm = lm_ptr + h * sl_h + dims[None, :]
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max of the raw scores
        total = tl.zeros([BLOCK_R], tl.float32)  # running sum of exp2((s - m) * scale2)
        for g0 in range(0, limit, BLOCK_G):
            blocks = g0 + tl.arange(0, BLOCK_G)
            keys = tl.load(lm + blocks[:, None] * sl_g, mask=blocks[:, None] < limit, other=0.0)  # [BLOCK_G, D]
            if IEEE:
                s = tl.dot(q, tl.trans(keys), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(keys))
            s = _as_matmul_output(s, q.dtype, ROUND)  # [BLOCK_R, BLOCK_G]
            s = tl.where(blocks[None, :] < limit, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite: the tile's first block is < limit
            total = total * tl.exp2((m - m_new) * scale2) + tl.sum(tl.exp2(s * scale2 - (m_new * scale2)[:, None]), 1)
            m = m_new
        lse = (m * scale2 + tl.log2(total)) * 0.6931471805599453  # back to natural log; -inf when limit is 0
        tl.store(lse_ptr + b * se_b + h * se_h + rows, lse, mask=rows < R)

    @triton.jit(do_not_specialize=["R", "n_old", "se_b", "se_h", "so_b", "so_h"])
    def _best_kernel(q_ptr, lm_ptr, limit_ptr, lse_ptr, out_ptr, R, n_old, scale2,
                     sq_b, sq_h, sq_r, sl_h, sl_g, se_b, se_h, so_b, so_h,
                     D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, IEEE: tl.constexpr,
                     ROUND: tl.constexpr):
        """out[b, h, g] = max_r q[b, h, r] . lm[h, g] / sqrt(d) - lse[b, h, r] for g < limit[b], else -inf."""
        g_tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        blocks = g_tile * BLOCK_G + tl.arange(0, BLOCK_G)
        dims = tl.arange(0, D)
        limit = tl.load(limit_ptr + b)
        keys = tl.load(lm_ptr + h * sl_h + blocks[:, None] * sl_g + dims[None, :], mask=blocks[:, None] < limit,
                       other=0.0)  # [BLOCK_G, D]
        q_base = q_ptr + b * sq_b + h * sq_h + dims[None, :]
        lse_base = lse_ptr + b * se_b + h * se_h
        n_rows = tl.where(g_tile * BLOCK_G < limit, R, 0)  # a tile wholly past the limit reads nothing
        # elementwise running max; one reduction over rows at the end
        acc = tl.full([BLOCK_R, BLOCK_G], float("-inf"), tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            q = tl.load(q_base + rows[:, None] * sq_r, mask=rows[:, None] < R, other=0.0)  # [BLOCK_R, D]
            lse2 = tl.load(lse_base + rows, mask=rows < R, other=float("inf")) * 1.4426950408889634  # [BLOCK_R]
            if IEEE:
                s = tl.dot(q, tl.trans(keys), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(keys))
            s = _as_matmul_output(s, q.dtype, ROUND)  # [BLOCK_R, BLOCK_G]
            acc = tl.maximum(acc, s * scale2 - lse2[:, None])  # rows with lse = +inf give -inf
        best = tl.max(acc, 0) * 0.6931471805599453  # [BLOCK_G]
        best = tl.where(blocks < limit, best, float("-inf"))
        tl.store(out_ptr + b * so_b + h * so_h + blocks, best, mask=blocks < n_old)


def best_rows(qg: torch.Tensor, lm_old: torch.Tensor, s_recent: torch.Tensor, old_limit: torch.Tensor,
              recent_missing: torch.Tensor, rows: torch.Tensor, scale: float,
              lse_tiles: Tiles | None = None, best_tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log of retrieval.block_probs(qg, [lm_old, lm_recent], [too_old, recent_missing], rows)
    (s_recent = qg @ lm_recent.mT) without the [B, Hkv, G*W, n_old] score tensor.

    qg [B, Hkv, G*W, d] (the chunks' rotated queries, grouped by key/value
    head), lm_old [Hkv, n_old, d] (slot-0 landmark keys, same dtype),
    s_recent [B, Hkv, G*W, k] (raw recent scores; a float32 one is scaled
    in place), old_limit [B] (block g counts for chunk b iff g < old_limit[b],
    i.e. too_old = arange(n_old) >= old_limit[:, None]),
    recent_missing [B, k], rows [B, 1, G*W] (the chunk's own queries).
    Returns float32 best_old [B, Hkv, n_old], recent_best [B, Hkv, k].
    Tiles: launch shapes (default: LSE_TILES / BEST_TILES for the dtype).
    """
    qg, lm_old = (t if t.stride(-1) == 1 else t.contiguous() for t in (qg, lm_old))
    old_limit = old_limit.to(torch.int32)  # a new (aligned) tensor: one kernel specialization whatever the batch
    lse, recent_best = with_recent(old_lse(qg, lm_old, old_limit, scale, lse_tiles), s_recent, recent_missing, rows,
                                   scale)
    return old_best(qg, lm_old, old_limit, lse[..., 0], scale, best_tiles), recent_best


def with_recent(lse_old: torch.Tensor, s_recent: torch.Tensor, recent_missing: torch.Tensor, rows: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The few recent landmarks' part of best_rows: s_recent [B, Hkv, G*W, k] raw scores (a float32 one is
    scaled in place), log-added to the old blocks' lse_old [B, Hkv, G*W].
    Returns the rows' lse [B, Hkv, G*W, 1] (+inf for rows that are not the
    chunk's own: other chunks' rows and padding never win a max) and the
    recent blocks' best [B, Hkv, k]."""
    s_recent = s_recent.float().div_(scale).masked_fill_(recent_missing[:, None, None], float("-inf"))
    lse = torch.logaddexp(lse_old, s_recent.logsumexp(-1))  # [B, Hkv, G*W]
    lse = lse.masked_fill_(~rows, float("inf"))[..., None]
    return lse, s_recent.sub_(lse).amax(2)


def old_lse(qg: torch.Tensor, lm_old: torch.Tensor, old_limit: torch.Tensor, scale: float,
            tiles: Tiles | None = None) -> torch.Tensor:
    """Pass 1: logsumexp over chunk b's blocks g < old_limit[b] of
    qg . lm_old[g] / scale, float32 [B, Hkv, G*W] (-inf for a chunk without
    any). qg and lm_old with unit stride in d, old_limit int32 [B] contiguous."""
    B, Hkv, R, d = qg.shape
    tiles = tiles or LSE_TILES[qg.dtype == torch.float32]
    lse = torch.full((B, Hkv, R), float("-inf"), device=qg.device)  # [B, Hkv, G*W]
    if lm_old.shape[1] and B:
        _lse_kernel[(triton.cdiv(R, tiles.rows), Hkv, B)](
            qg, lm_old, old_limit, lse, R, LOG2_E / scale, qg.stride(0), qg.stride(1), qg.stride(2),
            lm_old.stride(0), lm_old.stride(1), lse.stride(0), lse.stride(1), D=d, BLOCK_R=tiles.rows,
            BLOCK_G=tiles.blocks, IEEE=qg.dtype == torch.float32, ROUND=_round(qg), num_warps=tiles.warps,
            num_stages=tiles.stages)
    return lse


def old_best(qg: torch.Tensor, lm_old: torch.Tensor, old_limit: torch.Tensor, lse: torch.Tensor, scale: float,
             tiles: Tiles | None = None) -> torch.Tensor:
    """Pass 2: max over rows r of qg[r] . lm_old[g] / scale - lse[r], float32
    [B, Hkv, n_old]; -inf for blocks g >= old_limit[b]. lse [B, Hkv, G*W]
    contiguous in its last dim (+inf: a row that never wins)."""
    B, Hkv, R, d = qg.shape
    n_old = lm_old.shape[1]
    tiles = tiles or BEST_TILES[qg.dtype == torch.float32]
    best = torch.empty(B, Hkv, n_old, device=qg.device)  # [B, Hkv, n_old]
    if n_old and B:
        _best_kernel[(triton.cdiv(n_old, tiles.blocks), Hkv, B)](
            qg, lm_old, old_limit, lse, best, R, n_old, LOG2_E / scale, qg.stride(0), qg.stride(1), qg.stride(2),
            lm_old.stride(0), lm_old.stride(1), lse.stride(0), lse.stride(1), best.stride(0), best.stride(1),
            D=d, BLOCK_R=tiles.rows, BLOCK_G=tiles.blocks, IEEE=qg.dtype == torch.float32, ROUND=_round(qg),
            num_warps=tiles.warps, num_stages=tiles.stages)
    return best


def _round(qg: torch.Tensor) -> int:
    """The kernels' ROUND for inputs like qg (CPU tensors run only in the interpreter)."""
    if not ROUND_SCORES or qg.dtype == torch.float32:
        return 0
    return 2 if qg.is_cuda else 1


def usable(qg: torch.Tensor) -> bool:
    """Whether best_rows can take queries like qg [..., d] (CUDA, Triton, a
    head size tl.dot takes); retrieval.select_blocks also checks its first
    results against the plain form before it relies on it."""
    d = qg.shape[-1]
    return (ENABLED and triton is not None and qg.is_cuda and 16 <= d <= 256 and d & (d - 1) == 0
            and qg.dtype in (torch.float16, torch.bfloat16, torch.float32))
