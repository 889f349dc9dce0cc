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
    """
    B, H, Q, d = q.shape
    Hkv, N, S = k.shape[1], k.shape[2], k.shape[3]
    b = S - 1
    group = H // Hkv
    qg = q.reshape(B, Hkv, group * Q, d)
    scores = torch.einsum("bhqd,bhnsd->bhqns", qg, k) / math.sqrt(d)
    scores = scores.view(B, Hkv, group, Q, N, S).float()

    blk = torch.arange(N, device=q.device)
    off = torch.arange(S, device=q.device)
    qb = q_block.view(Q, 1, 1)
    qo = q_offset.view(Q, 1, 1)
    same = blk.view(1, N, 1) == qb
    earlier = blk.view(1, N, 1) < qb
    ordinary = off.view(1, 1, S) < b
    direct = same & ordinary & (off.view(1, 1, S) <= qo)  # [Q, N, S]
    inner = earlier & ordinary
    landmark = earlier & ~ordinary
    if key_valid is not None:
        direct = direct & key_valid
        inner = inner & key_valid
        landmark = landmark & key_valid

    neg = torch.finfo(scores.dtype).min
    outer_scores = scores.masked_fill(~(direct | landmark), neg)
    outer_lse = torch.logsumexp(outer_scores.flatten(-2), dim=-1)  # [B,Hkv,g,Q]
    outer_p = torch.exp(outer_scores - outer_lse[..., None, None])
    outer_p = outer_p.masked_fill(~(direct | landmark), 0.0)

    inner_scores = scores[..., :b].masked_fill(~inner[..., :b], neg)
    inner_p = torch.softmax(inner_scores, dim=-1).masked_fill(~inner[..., :b], 0.0)
    block_share = outer_p[..., b:].masked_fill(~landmark[..., b:], 0.0)  # [.., Q, N, 1]
    weights = outer_p[..., :b].masked_fill(~direct[..., :b], 0.0) + block_share * inner_p

    out = torch.einsum("bhgqns,bhnsd->bhgqd", weights.to(v.dtype), v[..., :b, :])
    return out.reshape(B, H, Q, d)


def sequence_grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> torch.Tensor:
    """Training form: the whole sequence, whose landmark sits at every (b+1)-th slot.

    q, k, v: [B, H(kv), T, d], rotated with ordinary positions. Differentiable.
    """
    T = q.shape[2]
    S = block_size + 1
    N = -(-T // S)
    pad = N * S - T
    kp = F.pad(k, (0, 0, 0, pad)).unflatten(2, (N, S))
    vp = F.pad(v, (0, 0, 0, pad)).unflatten(2, (N, S))
    pos = torch.arange(T, device=q.device)
    valid = (torch.arange(N * S, device=q.device) < T).view(N, S)
    return grouped_attention(q, kp, vp, pos // S, pos % S, valid)


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
