"""Landmark grouped softmax (method page, section 2).

Keys and values are laid out as whole blocks of ``b + 1`` slots, the last slot of
every block being its landmark. That one layout serves training (the whole
sequence cut into blocks) and inference (retrieved blocks followed by the local
window), so both forms share this code and cannot drift apart.

A query in block ``g`` at offset ``t`` sees:
  * its own block's ordinary tokens up to ``t`` directly (never its own landmark),
  * every earlier block ``h`` through its landmark: the landmark's share of the
    outer softmax is handed to ``h``'s ordinary tokens by an inner softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


NEG = -1e9  # finite "minus infinity": keeps fully masked rows free of NaN, also in backward
LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_block: torch.Tensor,
    q_offset: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-softmax attention over block-laid-out keys.

    q: [B, H, Q, d] (rotated). k, v: [B, Hkv, N, b+1, d] (k rotated); H is a
    multiple of Hkv (grouped-query attention). q_block, q_offset: [Q] long, the
    block index (into N) and offset within it of every query. key_valid:
    optional [N, b+1] bool marking slots that hold a real token (padding of a
    trailing partial block is False). Returns [B, H, Q, d].

    Every block gets one outer logit per query (its landmark score if earlier,
    the log-sum-exp of its visible tokens if it is the query's own block), and
    a token's weight is its block's outer probability times its softmax within
    the block. Only one exp and two reductions touch the full score tensor,
    which is what bounds CPU prefill speed.
    """
    B, H, Q, d = q.shape
    Hkv, N, S = k.shape[1], k.shape[2], k.shape[3]
    b = S - 1
    group = H // Hkv
    qg = q.reshape(B, Hkv, group * Q, d)
    scores = (qg @ k.reshape(B, Hkv, N * S, d).transpose(-1, -2)).float() * (1.0 / math.sqrt(d))
    scores = scores.view(B, Hkv, group, Q, N, S)

    blk = torch.arange(N, device=q.device)
    qb = q_block.view(Q, 1)
    same = (blk.view(1, N) == qb).float()  # [Q, N]
    earlier = (blk.view(1, N) < qb).float()
    later = 1.0 - same - earlier
    hidden_in_own = (torch.arange(S, device=q.device).view(1, S) > q_offset.view(Q, 1)).float()  # [Q, S]
    hidden_in_own[:, b] = 1.0  # a block's own landmark is never attended as a token
    is_landmark = torch.zeros(S, device=q.device)
    is_landmark[b] = 1.0
    # landmark slots carry no value; own block is causal; later blocks are hidden
    token_bias = NEG * torch.clamp(same[:, :, None] * hidden_in_own[:, None, :] + later[:, :, None] + is_landmark, max=1.0)
    if key_valid is not None:
        token_bias = token_bias + NEG * (~key_valid).float()

    tokens = scores + token_bias  # [.., Q, N, S]
    block_max = tokens.amax(dim=-1, keepdim=True)
    e = torch.exp(tokens - block_max)
    block_sum = e.sum(dim=-1)  # [.., Q, N]
    inner_lse = block_max[..., 0] + torch.log(block_sum)
    # outer logits per (query, block): earlier blocks through their landmark,
    # the own block through its tokens' log-sum-exp, later blocks hidden
    outer = earlier * scores[..., b] + same * inner_lse + NEG * later
    outer_lse = torch.logsumexp(outer, dim=-1, keepdim=True)
    share = torch.exp(outer - outer_lse) / block_sum  # mass of each block over its summed exps
    weights = (e * share[..., None]).view(B, Hkv, group * Q, N * S)

    out = weights.to(v.dtype) @ v.reshape(B, Hkv, N * S, d)
    return out.reshape(B, H, Q, d)


def blockwise_grouped_attention(q, k, v, q_block, q_offset, key_valid=None, tile: int = 1) -> torch.Tensor:
    """grouped_attention computed one tile of `tile` query blocks at a time.

    Queries must be sorted by block. Each tile sees only the key blocks up to
    its last query block, which skips the hidden upper triangle (about a third
    of the work for a typical prefill chunk) and keeps the score tensors small
    enough to stay in cache. Under autograd every tile is checkpointed, so
    training memory for attention is O(tile x T) rather than O(T^2).
    """
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    start = 0
    Q = q.shape[2]
    bounds = torch.searchsorted(q_block, torch.arange(int(q_block[0]) + tile, int(q_block[-1]) + tile + 1, tile,
                                                      device=q_block.device)).tolist()
    for end in bounds:
        if end <= start:
            continue
        n_keys = int(q_block[end - 1]) + 1
        args = (q[:, :, start:end], k[:, :, :n_keys], v[:, :, :n_keys], q_block[start:end], q_offset[start:end],
                None if key_valid is None else key_valid[:n_keys])
        outs.append(checkpoint(grouped_attention, *args, use_reentrant=False) if differentiable
                    else grouped_attention_inference(*args))
        start = end
    assert start == Q
    return torch.cat(outs, dim=2)


def sequence_grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                               tile: int | None = None) -> torch.Tensor:
    """Training form: the whole sequence, whose landmark sits at every (b+1)-th slot.

    q, k, v: [B, H(kv), T, d], rotated with ordinary positions. Differentiable.
    tile: if given, the memory-efficient blockwise form with that many query
    blocks per tile.
    """
    T = q.shape[2]
    S = block_size + 1
    N = -(-T // S)
    pad = N * S - T
    kp = F.pad(k, (0, 0, 0, pad)).unflatten(2, (N, S))
    vp = F.pad(v, (0, 0, 0, pad)).unflatten(2, (N, S))
    pos = torch.arange(T, device=q.device)
    valid = (torch.arange(N * S, device=q.device) < T).view(N, S)
    if tile is None:
        return grouped_attention(q, kp, vp, pos // S, pos % S, valid)
    return blockwise_grouped_attention(q, kp, vp, pos // S, pos % S, valid, tile=tile)


def reference_grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_landmark: torch.Tensor) -> torch.Tensor:
    """Slow, loop-by-loop statement of the method page's formulas, for tests.

    q, k, v: [H, T, d] (same head count); is_landmark: [T] bool. A block ends
    at (and includes) each landmark; anything after the last landmark is the
    open block.
    """
    H, T, d = q.shape
    block_of = torch.cumsum(is_landmark.long(), 0) - is_landmark.long()
    out = torch.zeros_like(q, dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            s = [(q[h, i].double() @ k[h, j].double()).item() / math.sqrt(d) for j in range(T)]
            own = [j for j in range(i + 1) if block_of[j] == block_of[i] and not is_landmark[j]]
            marks = [j for j in range(i) if is_landmark[j] and block_of[j] < block_of[i]]
            z = sum(math.exp(s[j]) for j in own) + sum(math.exp(s[j]) for j in marks)
            for j in own:
                out[h, i] += math.exp(s[j]) / z * v[h, j].double()
            for m in marks:
                members = [j for j in range(T) if block_of[j] == block_of[m] and not is_landmark[j]]
                zin = sum(math.exp(s[j]) for j in members)
                for j in members:
                    out[h, i] += math.exp(s[m]) / z * math.exp(s[j]) / zin * v[h, j].double()
    return out


@torch.no_grad()
def grouped_attention_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_block: torch.Tensor,
                                q_offset: torch.Tensor, key_valid: torch.Tensor | None = None,
                                slot_probs: bool = False, matmul_dtype: torch.dtype = torch.float32):
    """grouped_attention without autograd, for the engine: same arguments, same result.

    slot_probs=True also returns each key slot's attention probability per
    query row, [B, Hkv, group * Q, N, S] (rows ordered like the query heads of
    each key/value head, then queries; landmark slots 0): a block's outer
    probability times its token's inner one. Summed over a block's slots it is
    the block's outer probability. Answer evidence is ranked by it.

    matmul_dtype: what both matmuls run in (the softmaxes are float32
    either way). The GPU's layer-major prefill passes the model's bfloat16,
    for tensor cores and half the key/value traffic; the serial engine, the
    reference, keeps float32.

    On a CPU the score tensor's elementwise passes, not the matmuls, bound
    prefill speed, and a fresh multi-megabyte temporary per pass costs more in
    page faults than the arithmetic. So there is one score buffer, updated in
    place, and the masks are built once at [Q, N, S] size rather than at the
    score tensor's size.
    """
    B, H, Q, d = q.shape
    Hkv, N, S = k.shape[1], k.shape[2], k.shape[3]
    b = S - 1
    group = H // Hkv
    qg = (q.reshape(B, Hkv, group * Q, d).float() * (1.0 / math.sqrt(d))).to(matmul_dtype)
    scores = (qg @ k.reshape(B, Hkv, N * S, d).to(matmul_dtype).transpose(-1, -2)).float()
    scores = scores.view(B, Hkv, group, Q, N, S)

    blk = torch.arange(N, device=q.device).view(1, N)
    qb = q_block.view(Q, 1)
    same, earlier, later = blk == qb, blk < qb, blk > qb
    hidden = torch.arange(S, device=q.device).view(1, 1, S) > q_offset.view(Q, 1, 1)  # [Q, 1, S]
    # landmark slots carry no value (no item assignment: a CUDA graph cannot capture one)
    hidden = (hidden & same[:, :, None]) | later[:, :, None] | (torch.arange(S, device=q.device) == b)
    if key_valid is not None:
        hidden |= ~key_valid
    landmark = scores[..., b].clone()  # outer logits of earlier blocks, before masking
    scores.masked_fill_(hidden, NEG)
    block_max = scores.amax(dim=-1, keepdim=True)
    scores.sub_(block_max).exp_()
    block_sum = scores.sum(dim=-1)  # [.., Q, N]
    inner_lse = block_max[..., 0] + torch.log(block_sum)
    outer = torch.where(earlier, landmark, torch.where(same, inner_lse, torch.full_like(inner_lse, NEG)))
    probs = torch.softmax(outer, dim=-1)
    scores.mul_(probs.div_(block_sum)[..., None])
    weights = scores.view(B, Hkv, group * Q, N, S).clone() if slot_probs else None
    out = scores.view(B, Hkv, group * Q, N * S).to(matmul_dtype) @ v.reshape(B, Hkv, N * S, d).to(matmul_dtype)
    out = out.reshape(B, H, Q, d).to(q.dtype)
    return (out, weights) if slot_probs else out


class ScoreBuffers:
    """Score tensors that last_block_attention reuses from call to call.

    Why: the CPU's layer-major prefill calls it once per query block (about
    15,000 times per 10k tokens), each time with megabytes of scores. Fresh
    temporaries of that size come from the allocator as new pages, and on a
    CPU the page faults cost about as much as the arithmetic; one buffer per
    dtype, grown to the largest call, keeps them in cache.
    """

    def __init__(self):
        self.flat: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of `shape` (uninitialised) in this dtype's buffer."""
        n = math.prod(shape)
        buf = self.flat.get(dtype)
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self.flat[dtype] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


@torch.no_grad()
def last_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: torch.Tensor,
                         matmul_dtype: torch.dtype, buffers: ScoreBuffers | None = None) -> torch.Tensor:
    """grouped_attention_inference for queries that all sit in the last key
    block (a prefill tile of one query block), with both matmuls in
    matmul_dtype: the CPU's layer-major fast path.

    q: [B, H, Q, d]; k, v: [B, Hkv, N, b+1, d]; q_offset: [Q]. Why it is faster
    on a CPU, where the passes over the score tensor bound prefill:
      * every earlier block is wholly visible, so the only masks are the
        landmark slots and the own block's causal triangle: two small writes
        instead of a masked pass over the score tensor;
      * scores are in base-2 units (log2(e) folded into the query scale), as
        exp2 runs about 3x faster than exp here;
      * in bfloat16 the matmuls run about 3x faster than in float32 on a CPU
        with AVX512-BF16, and round the scores as transformers' eager
        attention does for a bfloat16 model; the softmaxes stay float32;
      * the score tensors live in `buffers` (ScoreBuffers) when given.
    With matmul_dtype=float32 it equals grouped_attention_inference to float32
    rounding (tests/test_grouped_attention.py).
    """
    B, H, Q, d = q.shape
    Hkv, N, S = k.shape[1], k.shape[2], k.shape[3]
    b, group = S - 1, H // Hkv
    buffers = buffers or ScoreBuffers()
    qg = (q.reshape(B * Hkv, group * Q, d).float() * (LOG2_E / math.sqrt(d))).to(matmul_dtype)
    raw = buffers.take((B * Hkv, group * Q, N * S), matmul_dtype, q.device)  # matmul in, matmul out
    torch.bmm(qg, k.reshape(B * Hkv, N * S, d).to(matmul_dtype).transpose(-1, -2), out=raw)
    if matmul_dtype == torch.float32:
        scores = raw.view(B, Hkv, group, Q, N, S)  # base-2 logits, float32
    else:
        scores = buffers.take((B, Hkv, group, Q, N, S), torch.float32, q.device)
        scores.view(raw.shape).copy_(raw)
    landmark = scores[..., : N - 1, b].clone()  # outer logits of the earlier blocks  # [B, Hkv, G, Q, N-1]
    scores[..., b] = NEG  # landmark slots carry no value
    hidden = torch.arange(S, device=q.device) > q_offset[:, None]  # own block: causal  # [Q, S]
    scores[..., N - 1, :].masked_fill_(hidden, NEG)
    block_max = scores.amax(dim=-1, keepdim=True)
    scores.sub_(block_max).exp2_()
    block_sum = scores.sum(dim=-1)  # [B, Hkv, G, Q, N]
    own_lse = block_max[..., N - 1, 0] + torch.log2(block_sum[..., N - 1])
    outer = torch.cat([landmark, own_lse[..., None]], dim=-1).mul_(LN_2)  # natural units
    probs = torch.softmax(outer, dim=-1)  # [B, Hkv, G, Q, N]
    scores.mul_(probs.div_(block_sum)[..., None])
    if matmul_dtype != torch.float32:
        raw.copy_(scores.view(raw.shape))  # weights, in the matmul's dtype  # [B*Hkv, G*Q, N*S]
    out = torch.bmm(raw, v.reshape(B * Hkv, N * S, d).to(matmul_dtype))  # [B*Hkv, G*Q, d]
    return out.view(B, H, Q, d).to(q.dtype)
