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


NEG = -1e9  # finite "minus infinity": keeps fully masked rows free of NaN, also in backward


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

    The two-level softmax collapses into one: a token j of an earlier block g
    gets weight exp(s_ij + s_iL_g - lse_g(i)) / Z, where lse_g is the log-sum-exp
    of the query's scores over g's tokens, and these weights over g sum to
    exp(s_iL_g) / Z. So it is an ordinary softmax over ordinary tokens after
    adding a per-(query, block) bias, which costs a few passes over the scores.
    """
    B, H, Q, d = q.shape
    Hkv, N, S = k.shape[1], k.shape[2], k.shape[3]
    b = S - 1
    group = H // Hkv
    qg = q.reshape(B, Hkv, group * Q, d)
    scores = torch.einsum("bhqd,bhnsd->bhqns", qg, k).float() * (1.0 / math.sqrt(d))
    scores = scores.view(B, Hkv, group, Q, N, S)

    blk = torch.arange(N, device=q.device)
    qb = q_block.view(Q, 1)
    same = (blk.view(1, N) == qb).float()  # [Q, N]
    earlier = (blk.view(1, N) < qb).float()
    later = 1.0 - same - earlier
    after_query = (torch.arange(b, device=q.device).view(1, b) > q_offset.view(Q, 1)).float()  # [Q, b]
    # own block: causal; later blocks: hidden; padding: hidden
    token_bias = NEG * (same[:, :, None] * after_query[:, None, :] + later[:, :, None])  # [Q, N, b]
    if key_valid is not None:
        token_bias = token_bias + NEG * (~key_valid[:, :b]).float()

    tokens = scores[..., :b] + token_bias
    inner_lse = torch.logsumexp(tokens, dim=-1)  # [.., Q, N]
    block_bias = earlier * (scores[..., b] - inner_lse)  # the landmark's share, per (query, block)
    weights = torch.softmax((tokens + block_bias[..., None]).flatten(-2), dim=-1).view_as(tokens)

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
