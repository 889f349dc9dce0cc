"""Block selection: which stored blocks a step reads (top-k over landmark
scores, method page, section 3), and the record of what every step read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grouped_attention import LOG2_E


def top_blocks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best blocks of scores [..., n] (last dim: block id) as ids in
    ascending order [..., k], with their scores.

    Ties go to the more recent block. They are common: at layer 0 every
    landmark key is the landmark embedding's, so all landmarks sharing the
    oldest slot score alike, and topk's own choice among them differs
    between devices and tensor sizes (and so between prefill paths).
    """
    # One int64 key per block orders by score, then by id: the float's bits
    # as an order-preserving int32 (negatives flipped) above the block id.
    # A top-k over unique keys needs no full stable sort (8x faster at 16k blocks).
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 ties with 0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    key = (bits << 32) + torch.arange(scores.shape[-1], device=scores.device)
    best = _largest_by_max(key, k) if scores.is_cuda else key.topk(k, dim=-1).values
    ids = (best & 0xFFFFFFFF).sort(dim=-1).values
    return ids, scores.gather(-1, ids)


def _largest_by_max(key: torch.Tensor, k: int) -> torch.Tensor:
    """key.topk(k).values (unordered) for unique keys, as k max-reductions: on
    a GPU, a 64-bit topk over 16,000 landmarks takes ~150 us (a third of a
    decoding step at a million tokens), k small reductions a fraction."""
    key = key.clone()
    out = []
    for _ in range(k):
        top = key.amax(dim=-1, keepdim=True)
        out.append(top)
        key.masked_fill_(key == top, torch.iinfo(torch.int64).min)
    return torch.cat(out, dim=-1)


def landmark_probs(qg: torch.Tensor, landmarks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over blocks of q . landmark / sqrt(d), in float32: qg [Hkv, R, d]
    (a key/value head's query rows), landmarks [Hkv, n, d] (rotated) ->
    [Hkv, R, n]; valid [n]: blocks to include (the rest get 0). The one pass
    over every (query, stored block) pair, so at a million tokens it bounds a
    CPU's prefill: the exponent is taken as exp2, about 3x faster than exp
    there, and the buffer is reused in place."""
    d = qg.shape[-1]
    scores = (qg @ landmarks.transpose(-1, -2)).float().mul_(LOG2_E / d**0.5)  # base-2 logits
    if valid is not None:
        scores.masked_fill_(~valid, float("-inf"))
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp2_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))


@dataclass
class RetrievalStep:
    """What every layer and key/value head retrieved for one step."""

    kind: str  # "chunk" or "token"
    position: int  # ordinary tokens consumed before this step
    block_ids: torch.Tensor  # [layers, Hkv, r] long
    scores: torch.Tensor  # [layers, Hkv, r] float: softmax over blocks, max over queries


@dataclass
class RetrievalTrace:
    steps: list[RetrievalStep] = field(default_factory=list)
