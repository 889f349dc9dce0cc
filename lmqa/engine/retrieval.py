"""Block selection: which stored blocks a step reads (top-k over landmark
scores, method page, section 3), and the record of what every step read.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import landmark_scoring
from .compiled import MaybeCompiled
from .grouped_attention import LOG2_E
from .plan import PrefillBudget, batches
from .positions import CosSin, rotate


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


def block_probs(qg: torch.Tensor, keys: list[torch.Tensor], hidden: list[torch.Tensor | None],
                rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The block-scoring rule (method page, section 3), its one statement:
    for each key/value head, a softmax over blocks of q . landmark / sqrt(d)
    (float32), then the maximum over the query rows (the head group's query
    heads times the step's queries).

    qg [..., R, d]: rotated query rows grouped by key/value head; keys: one
    or more parts [..., n_i, d] of rotated landmark keys (broadcast against
    qg's leading dims) whose blocks together are the softmax's; hidden: per
    part, None or a bool mask broadcastable to [..., 1, n_i] of blocks that
    are not the rows' to read (probability 0); rows: None (all) or a bool
    mask [..., R, 1] of the rows that count (the others give 0). Returns per
    part the blocks' best probability [..., n_i].

    The one pass over every (query, stored block) pair, so at a million
    tokens it bounds a CPU's prefill: the exponent is taken as exp2, about 3x
    faster than exp there, and each part's buffer is reused in place."""
    d = qg.shape[-1]
    scores = []
    for lm, mask in zip(keys, hidden):
        s = (qg @ lm.transpose(-1, -2)).float().mul_(LOG2_E / d**0.5)  # base-2 logits
        scores.append(s if mask is None else s.masked_fill_(mask, float("-inf")))
    some = [s for s in scores if s.shape[-1]]  # a part may have no blocks (no old ones yet)
    top = some[0].amax(dim=-1, keepdim=True)
    for s in some[1:]:
        top = torch.maximum(top, s.amax(dim=-1, keepdim=True))
    total = None
    for s in some:
        part = s.sub_(top).exp2_().sum(dim=-1, keepdim=True)
        total = part if total is None else total + part
    out = []
    for s in scores:
        s.div_(total)
        out.append((s if rows is None else s.masked_fill_(~rows, 0.0)).amax(dim=-2))
    return out


def pick_blocks(best: torch.Tensor, n_before: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each chunk's blocks: best [C, Hkv, n] (block probabilities
    by block id), n_before [C] (blocks g < n_before[c] are chunk c's; None:
    all n are every chunk's) ->
    ids [C, Hkv, k] ascending, the k - r missing ones first as -1 (r =
    min(k, n_before[c])), and their probabilities [C, Hkv, k] (0 where missing)."""
    n = best.shape[-1]
    if n_before is None and n >= k:  # none missing: top_blocks' ids are ascending
        return top_blocks(best, k)
    if n_before is not None:
        best = best.masked_fill(torch.arange(n, device=best.device) >= n_before[:, None, None], -1.0)
    if n < k:
        best = F.pad(best, (0, k - n), value=-1.0)
    block, top = top_blocks(best, k)
    key, order = torch.where(top < 0, -1, block).sort(dim=-1)
    return key, top.gather(-1, order).clamp_(min=0.0)


def select_blocks(queries: torch.Tensor, landmarks: torch.Tensor, n_before: list[int] | torch.Tensor, k: int,
                  slots: CosSin, like_first: torch.Tensor | None = None,
                  rows: list[tuple[int, int]] | torch.Tensor | None = None, budget: PrefillBudget | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which stored blocks each chunk reads: per chunk and key/value head, the
    top-k of the blocks stored before it by block_probs over its own query
    rows, landmark keys at their slots (positions.py: the k most recent at
    slots 1..k, older ones sharing slot 0). The one entry to block
    selection for every step (serial, layer-major, the fixed-shape decode).

    queries [C, H, W, d]: each chunk's rotated queries; landmarks [Hkv, n, d]:
    unrotated landmark keys of at least every block any chunk may read;
    n_before: blocks stored before each chunk, a list (known on the host) or
    a device tensor [C] (a fixed-shape step: no host reads, every block of
    `landmarks` scored and masked; needs n_before >= k); slots: cos/sin
    [k + 1, d] of the landmark slots (RopeTables.landmarks); like_first
    [Hkv, >= n]: which landmark keys equal block 0's (LayerBlockStore: at
    layer 0 all do), scored as block 0 is; rows: each chunk's own query
    rows among W, as [lo, hi) ranges or a bool mask [C, W] (default: all);
    budget: how to batch (PrefillBudget: score_elements, batched_scoring,
    compile; default: the CPU's).

    Returns block ids [C, Hkv, k] (ascending, the missing first as -1) and
    their block probabilities [C, Hkv, k] (0 where missing).

    Forms, all the same rule: one chunk at a time (a CPU, one chunk, a
    fixed-shape step: each chunk's own rows against its blocks, in row
    tiles of at most budget.score_elements scores: the fewest passes over
    the scores), or batches of chunks (budget.batched_scoring, a GPU: the
    old landmarks' scores shared, the recent k per chunk, hidden where not
    the chunk's). On CUDA
    the old landmarks' part runs in landmark_scoring's fused kernels, which
    never store the scores, when they pass a first check against this form.
    """
    budget = budget or _CPU
    C, H, W, d = queries.shape
    Hkv = landmarks.shape[0]
    on_host = not isinstance(n_before, torch.Tensor)
    lm_old = rotate(landmarks, slots[0][0], slots[1][0])  # every landmark at slot 0  # [Hkv, n, d]
    recent_cos, recent_sin = slots[0][1:], slots[1][1:]  # slots 1..k  # [k, d]
    if on_host and budget.batched_scoring and C > 1:
        nb = torch.tensor(n_before, device=queries.device)
        old_limit = (nb - k).clamp(min=0)  # blocks older than a chunk's k most recent  # [C]
        best = _batched(queries, landmarks, lm_old, n_before, nb, old_limit, k, recent_cos, recent_sin, rows, budget)
        if like_first is not None:  # bitwise one score for equal keys at slot 0 (a matmul may differ by column)
            n = best.shape[-1]
            same = like_first[:, :n] & (torch.arange(n, device=best.device) < old_limit[:, None, None])
            best = torch.where(same, best[..., :1], best)
        return pick_blocks(best, nb, k)
    # one chunk at a time: its own rows against its blocks, by block id
    width = max(n_before, default=0) if on_host else landmarks.shape[1]
    best = landmarks.new_zeros(C, Hkv, width, dtype=torch.float32) if C > 1 or not width else None
    for c in range(C):
        if on_host:  # exactly the chunk's blocks
            n = n_before[c]
            if not n:
                continue
            r, n_old, hidden = min(k, n), max(n - k, 0), None
            keys = torch.cat([lm_old[:, :n_old], rotate(landmarks[:, n_old:n], recent_cos[k - r :], recent_sin[k - r :])],
                             dim=1)  # [Hkv, n, d]
        else:  # every block there is room for, those not stored masked (n_before >= k)
            n, n_old = width, (n_before[c] - k).clamp(min=0)
            hidden = torch.arange(width, device=n_before.device) >= n_before[c]
            recent = n_before[c] - k + torch.arange(k, device=n_before.device)
            keys = lm_old.clone()  # the k most recent at their own slots
            keys.index_copy_(1, recent, rotate(landmarks[:, recent], recent_cos, recent_sin))
        lo, hi = rows[c] if isinstance(rows, list) else (0, W)
        qg = queries[c, :, lo:hi].reshape(Hkv, -1, d)  # [Hkv, G * rows, d]
        tile = max(1, budget.score_elements // (Hkv * n))
        tiles = [block_probs(qg[:, i : i + tile], [keys], [hidden])[0] for i in range(0, qg.shape[1], tile)]
        chunk = tiles[0] if len(tiles) == 1 else torch.stack(tiles).amax(dim=0)  # [Hkv, n]
        if like_first is not None:  # bitwise one score for equal keys at slot 0 (a matmul may differ by column)
            old = like_first[:, :n] & (torch.arange(n, device=chunk.device) < n_old) if not on_host else like_first[:, :n_old]
            chunk[:, : old.shape[1]] = torch.where(old, chunk[:, :1], chunk[:, : old.shape[1]])
        if C == 1:
            best = chunk[None]
        else:
            best[c, :, :n] = chunk
    if on_host and all(n == width for n in n_before):  # every column is every chunk's
        return pick_blocks(best, None, k)
    return pick_blocks(best, torch.tensor(n_before, device=best.device) if on_host else n_before, k)


def _batched(queries, landmarks, lm_old, n_before, nb, old_limit, k, recent_cos, recent_sin, rows, budget):
    """select_blocks' batched form: block probabilities [C, Hkv, n] by block id."""
    C, H, W, d = queries.shape
    Hkv = landmarks.shape[0]
    group = H // Hkv
    w = torch.arange(W, device=queries.device)
    if rows is None:
        rows = [(0, W)] * C
    if isinstance(rows, list):
        rows = torch.stack([(w >= lo) & (w < hi) for lo, hi in rows])
    rows = rows[:, None, None].expand(-1, 1, group, -1).reshape(C, 1, group * W)  # the grouped query rows
    n_old = [max(n - k, 0) for n in n_before]
    fused = _fused_usable(queries)
    costs = [H * W * (k + 1) + 12 * Hkv * (o + k) if fused else H * W * (o + k) for o in n_old]
    out = landmarks.new_zeros(C, Hkv, max(n_old) + k, dtype=torch.float32)
    for lo, hi in batches(costs, budget.score_elements):
        width = n_old[hi - 1]  # the batch's largest
        qg = queries[lo:hi].reshape(hi - lo, Hkv, group * W, d)  # [B, Hkv, G*W, d]
        recent = nb[lo:hi, None] - k + torch.arange(k, device=nb.device)  # the k most recent ids  # [B, k]
        lm_recent = rotate(landmarks[:, recent.clamp(min=0)].transpose(0, 1), recent_cos, recent_sin)  # [B, Hkv, k, d]
        if fused:
            best_old, best_recent = (t.exp() for t in landmark_scoring.best_rows(
                qg, lm_old[:, :width], qg @ lm_recent.transpose(-1, -2), old_limit[lo:hi], recent < 0, rows[lo:hi],
                d**0.5))
        else:
            too_old = torch.arange(width, device=nb.device) >= old_limit[lo:hi, None]  # [B, width]
            best_old, best_recent = _BLOCK_PROBS(budget.compile, qg, [lm_old[:, :width], lm_recent],
                                                 [too_old[:, None, None], (recent < 0)[:, None, None]],
                                                 rows[lo:hi, ..., None])
        out[lo:hi, :, :width] = best_old
        out[lo:hi].scatter_reduce_(2, recent.clamp(min=0)[:, None].expand(-1, Hkv, -1), best_recent, "amax")
    return out


def _fused_usable(queries: torch.Tensor) -> bool:
    """Whether select_blocks may score queries like these with landmark_scoring's kernels."""
    return landmark_scoring.usable(queries) and _fused_checked(queries.device, queries.dtype, queries.shape[-1])


@functools.cache
def _fused_checked(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    """Compile and run the fused kernels once on a small input against
    block_probs; on any failure (a GPU or Triton that cannot build them, a
    wrong result) warn once and keep the plain form."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        B, Hkv, R, n, k = 3, 2, 40, 150, 2
        qg, lm, lm_recent = (torch.randn(*shape, device=device, generator=g).to(dtype)
                             for shape in ((B, Hkv, R, d), (Hkv, n, d), (B, Hkv, k, d)))
        old_limit = torch.tensor([n, 70, 0], device=device)
        missing = torch.tensor([[False, False], [False, False], [True, False]], device=device)
        rows = torch.arange(R, device=device).expand(B, 1, R) >= 3
        got = landmark_scoring.best_rows(qg, lm, qg @ lm_recent.transpose(-1, -2), old_limit, missing, rows, d**0.5)
        too_old = torch.arange(n, device=device) >= old_limit[:, None]
        want = block_probs(qg, [lm, lm_recent], [too_old[:, None, None], missing[:, None, None]], rows[..., None])
        for a, b in zip(got, want):  # logarithms (-inf exactly where a block is not the chunk's)
            torch.testing.assert_close(a, b.log(), atol=0.1, rtol=0.02)
        return True
    except Exception as e:  # noqa: BLE001 - any failure: the plain form is the reference
        warnings.warn(f"fused landmark scoring unavailable, using the plain path: {e}")
        return False


# the batched (GPU) form: compiled, its passes over the score tensors fuse
_BLOCK_PROBS = MaybeCompiled(block_probs)
_CPU = PrefillBudget.for_device(torch.device("cpu"))


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
