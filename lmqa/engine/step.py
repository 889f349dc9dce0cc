"""The landmark step, its one statement: one decoder layer for a batch of
chunks (method page, section 3).

landmark_layer runs one layer of a LlamaForCausalLM for every chunk of a
StepPlan: it projects every token (the model's own norms and projections,
so bitsandbytes layers and peft adapters work unchanged), stores the new
keys/values in the layer's LandmarkCache (closed blocks to its store, the
rest as its open block), selects each chunk's blocks
(retrieval.select_blocks), gathers and places them (positions.py), attends
with the grouped softmax over the retrieved blocks and the chunk's window
(the open block it inherits and its own tokens), and adds the attention
output and the MLP to the hidden states.

Its callers differ only in the plan:
  * serial prefill: one chunk per plan, every layer, then the next chunk;
  * layer-major prefill: all the chunks of a super-chunk per plan, layer by
    layer (a chunk reads only this layer's keys of earlier positions);
  * a decoding step: one token, one chunk; on CUDA, FixedStep's plan in
    fixed shapes (its position and block count device scalars), captured
    as a CUDA graph of this same function (graph_decode.py).
The engine (landmark_engine.py) plans, keeps the trace and token count, and
records evidence; this module changes nothing but the caches it is given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cache import LandmarkCache
from .compiled import MaybeCompiled
from .grouped_attention import ScoreBuffers, grouped_attention_inference, last_block_attention
from .plan import Chunk, PrefillBudget, batches
from .positions import RopeTables, rotate
from .retrieval import select_blocks


class Evidence(NamedTuple):
    """What one layer's chunk read, for answer evidence: block ids [Hkv, n]
    (the retrieved, then the window's) and each of their slots' attention
    probability per query row [Hkv, rows, n, S]."""

    block_ids: torch.Tensor
    probs: torch.Tensor


class StepPlan:
    """Where every chunk of a step sits, on the host and as device index tensors.

    "Cache coordinates": the inherited open block's p0 positions followed by
    the step's N new positions, so block m of them is positions [m*S, (m+1)*S)
    and a chunk's window starts at a block boundary. A chunk c's window is
    win_len[c] rows from there, its own queries the rows from opens[c] on.
    """

    fixed = False

    def __init__(self, chunks: list[Chunk], n_positions: int, open_len: int, n_blocks: int, block_size: int, k: int,
                 device: torch.device):
        S = block_size + 1
        self.S, self.k = S, k
        p0, n0 = open_len, n_blocks
        first = chunks[0].start
        self.N = n_positions
        self.n_cache_blocks = -(-(p0 + n_positions) // S)
        # per chunk (host): window start (a block boundary) and length, open part, blocks before it
        self.opens = opens = [(p0 + c.start - first) % S for c in chunks]
        win_start = [p0 + c.start - first - p for c, p in zip(chunks, opens)]
        self.win_len = [p + c.length for c, p in zip(chunks, opens)]
        self.n_before = [n0 + a // S for a in win_start]
        self.r = [min(k, nb) for nb in self.n_before]
        self.n_win_blocks = max(-(-w // S) for w in self.win_len)
        self.W = self.n_win_blocks * S  # window rows per chunk, padded
        self.rows = list(zip(opens, self.win_len))  # each chunk's own queries, [lo, hi) of its window rows
        # one chunk (the serial steps, decoding): its window is every cache block and its
        # tokens are rows opens[0]... of it, so the layouts below are slices, not gathers
        self.single = len(chunks) == 1
        W = self.W
        w = torch.arange(W, device=device)
        self.row_block = w // S  # [W]
        self.row_offset = w % S
        if self.single:
            return
        a = torch.tensor(win_start, device=device)
        # window blocks of each chunk, in cache blocks  # [C, n_win_blocks]
        self.win_blocks = (a[:, None] // S + torch.arange(self.n_win_blocks, device=device)).clamp(
            max=self.n_cache_blocks - 1)
        # which new token gives the query of window row w (rows outside the chunk: any; discarded)  # [C, W]
        self.q_rows = (a[:, None] - p0 + w).clamp(0, n_positions - 1)
        # each new token's row in the [C * W] window rows  # [N]
        x = torch.arange(p0, p0 + n_positions, device=device)
        starts = torch.tensor([p0 + c.start - first for c in chunks], device=device)
        chunk_of = torch.searchsorted(starts, x, right=True) - 1
        self.token_rows = chunk_of * W + (x - a[chunk_of])

    # ----- what differs from the fixed-shape plan -----
    def store(self, cache: LandmarkCache, keys: torch.Tensor, values: torch.Tensor):
        """The new tokens' keys/values into the cache; the window blocks of
        the whole step [n_cache_blocks, Hkv, S, d]."""
        return cache.update_and_fetch(keys, values)

    def queries(self, q: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """Every chunk's queries [N, H, d] in window layout, rotated at window
        positions: [C, H, W, d] (rows that are not the chunk's: any values)."""
        if self.single:
            lo, hi = self.rows[0]
            out = q.new_empty(1, q.shape[1], self.W, q.shape[2])
            out[0, :, lo:hi] = rotate(q.transpose(0, 1), rope.window[0][lo:hi], rope.window[1][lo:hi])
            return out
        return rotate(q[self.q_rows].transpose(1, 2), *rope.window)

    def windows(self, cache_k: torch.Tensor, cache_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each chunk's window blocks, unrotated, of the step's [n_cache_blocks, Hkv, S, d]: [C, Hkv, n_win, S, d]."""
        if self.single:
            return cache_k.transpose(0, 1)[None], cache_v.transpose(0, 1)[None]
        return cache_k[self.win_blocks].transpose(1, 2), cache_v[self.win_blocks].transpose(1, 2)

    def outputs(self, out_win: torch.Tensor) -> torch.Tensor:
        """Each new token's output row of [C, H, W, d], heads concatenated: [N, H * d]."""
        H, d = out_win.shape[1], out_win.shape[3]
        if self.single:
            lo, hi = self.rows[0]
            return out_win[0, :, lo:hi].transpose(0, 1).reshape(-1, H * d)
        return out_win.transpose(1, 2).reshape(-1, H * d)[self.token_rows]

    def landmarks(self, cache: LandmarkCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Landmark keys [Hkv, n, d] and which equal block 0's [Hkv, n]."""
        return cache.landmark_keys(), cache.like_first()

    def gather(self, cache: LandmarkCache, ids: torch.Tensor):
        """Keys, values [Hkv, m, b, d] and landmark keys [Hkv, m, d] of ids [Hkv, m] (all valid)."""
        return cache.gather(ids)

    def chunk_rows(self, c: int) -> tuple[int, int]:
        return self.rows[c]


class FixedStep:
    """A one-token plan in fixed shapes for a CUDA graph: the token's slot p
    in the open block and the block count n are device scalars set before
    each replay (set()), every block the stores have room for is scored
    (those past n masked), and the retrieved blocks are read from the
    stores' buffers (a view of their rows would end at the count of capture
    time). It serves a token that closes no block, with at least k blocks
    stored, in device-resident stores in the compute dtype (graph_decode.can_step)."""

    fixed = True

    def __init__(self, block_size: int, k: int, device: torch.device):
        S = block_size + 1
        self.S, self.k = S, k
        self.N, self.W, self.n_win_blocks = 1, 1, 1
        self.p = torch.zeros(1, dtype=torch.long, device=device)  # the token's slot in the open block
        self.n = torch.zeros(1, dtype=torch.long, device=device)  # blocks stored
        self.n_before, self.r, self.rows = self.n, [k], None
        self.row_block = torch.zeros(1, dtype=torch.long, device=device)
        self.row_offset = self.p

    def set(self, open_len: int, n_blocks: int) -> None:
        self.p.fill_(open_len)
        self.n.fill_(n_blocks)

    def store(self, cache: LandmarkCache, keys: torch.Tensor, values: torch.Tensor):
        cache.write(keys, values, self.p)  # the caller advances the cache after the step
        return cache.open_keys[None], cache.open_values[None]

    def queries(self, q: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        return rotate(q.transpose(0, 1)[None], *(t[self.p] for t in rope.window))

    def windows(self, cache_k: torch.Tensor, cache_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cache_k[:, :, None], cache_v[:, :, None]  # the open block: [1, Hkv, 1, S, d]

    def outputs(self, out_win: torch.Tensor) -> torch.Tensor:
        return out_win.reshape(1, -1)

    def landmarks(self, cache: LandmarkCache) -> tuple[torch.Tensor, torch.Tensor]:
        store = cache.store
        return store.landmark_keys.data.transpose(0, 1), store.like_first.data.transpose(0, 1)

    def gather(self, cache: LandmarkCache, ids: torch.Tensor):
        store = cache.store
        heads = torch.arange(ids.shape[0], device=ids.device)[:, None]
        return store.keys.codes.data[ids, heads], store.values.codes.data[ids, heads], store.landmark_keys.data[ids, heads]

    def chunk_rows(self, c: int) -> tuple[int, int]:
        return 0, 1


class Kernels(NamedTuple):
    """How a step attends: reference (the serial engine's: float32 matmuls,
    one query block at a time) or the fast forms for budget's device (a
    CPU's one query block at a time in the model dtype, a GPU's batched
    query tiles, compiled)."""

    budget: PrefillBudget
    reference: bool = False


def landmark_layer(index: int, layer, h: torch.Tensor, cache: LandmarkCache, plan: StepPlan | FixedStep,
                   rope: RopeTables, kernels: Kernels, evidence_rows: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Evidence | None]:
    """Layer `index` of the model for every chunk of plan: h [N, D] (the
    step's positions, landmarks included) is updated in place and returned,
    with the retrieved block ids [C, Hkv, k] (ascending, the k - r missing
    first as -1), their scores [C, Hkv, k] and, when evidence_rows (the
    one chunk's query rows to record, as offsets from its first new token)
    is given or the plan is fixed, the chunk's Evidence."""
    attn, budget = layer.self_attn, kernels.budget
    N, dtype = h.shape[0], cache.open_keys.dtype
    Hkv, S, d = cache.open_keys.shape
    H = attn.config.num_attention_heads
    # Projections in row tiles, except at layer 0: a matmul may round a row
    # differently in tiles of other heights, and layer 0's landmark keys must
    # stay bitwise equal (see retrieval.select_blocks' like_first).
    tile = budget.row_tile if index else N
    projections, shapes = (attn.q_proj, attn.k_proj, attn.v_proj), ((H, d), (Hkv, d), (Hkv, d))
    if N <= tile:
        x = layer.input_layernorm(h)
        q, *kv_new = (proj(x).view(N, *shape).to(dtype) for proj, shape in zip(projections, shapes))
    else:
        q, *kv_new = (h.new_empty(N, *shape, dtype=dtype) for shape in shapes)
        for lo in range(0, N, tile):
            x = layer.input_layernorm(h[lo : lo + tile])
            for proj, dest in zip(projections, (q, *kv_new)):
                dest[lo : lo + tile] = proj(x).view(-1, *dest.shape[1:])
    del x
    cache_k, cache_v = plan.store(cache, *kv_new)  # [n_cache_blocks, Hkv, S, d]
    del kv_new
    q_win = plan.queries(q, rope)  # [C, H, W, d]
    del q
    landmarks, like_first = plan.landmarks(cache)
    ids, scores = select_blocks(q_win, landmarks, plan.n_before, plan.k, rope.landmarks, like_first, plan.rows,
                                budget)
    blocks_k, blocks_v = _retrieved(cache, plan, ids, rope)  # [C, Hkv, k, S, d]
    # each chunk's window blocks  # [C, Hkv, n_win_blocks, S, d]
    win_k, win_v = plan.windows(cache_k, cache_v)
    win_k = rotate(win_k, *(t.view(plan.n_win_blocks, S, d) for t in rope.window))
    del cache_k, cache_v
    seen = None
    if evidence_rows is not None or plan.fixed:
        out_win, seen = _attend_recorded(q_win, blocks_k, blocks_v, win_k, win_v, ids, plan, evidence_rows)
    elif kernels.reference or budget.query_tile == 1:
        out_win = _attend_per_block(q_win, blocks_k, blocks_v, win_k, win_v, plan, dtype, kernels.reference)
    else:
        out_win = _attend_batched(q_win, blocks_k, blocks_v, win_k, win_v, plan, budget, dtype)
    del q_win, blocks_k, blocks_v, win_k, win_v
    out = plan.outputs(out_win).to(h.dtype)  # each token's output row, heads concatenated  # [N, H * d]
    for lo in range(0, N, budget.row_tile):
        part = h[lo : lo + budget.row_tile]
        part += attn.o_proj(out[lo : lo + budget.row_tile])
        part += layer.mlp(layer.post_attention_layernorm(part))
    return h, ids, scores, seen


def _retrieved(cache: LandmarkCache, plan: StepPlan | FixedStep, ids: torch.Tensor,
               rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Every chunk's k block slots, retrieved blocks' keys (landmark in the
    last slot, rotated into slots 1..k) and values: [C, Hkv, k, S, d]
    (the slots of missing blocks hold block 0, never attended)."""
    C, Hkv, k = ids.shape
    S, d = cache.open_keys.shape[1:]
    if not max(plan.r):
        empty = cache.open_keys.new_empty(C, Hkv, k, S, d)
        return empty, empty
    rk, rv, rlm = plan.gather(cache, ids.clamp(min=0).transpose(0, 1).reshape(Hkv, C * k))  # [Hkv, C*k, b, d]
    blocks_k = rotate(torch.cat([rk, rlm[:, :, None]], dim=2).view(Hkv, C, k, S, d).transpose(0, 1), *rope.blocks)
    blocks_v = F.pad(rv, (0, 0, 0, 1)).view(Hkv, C, k, S, d).transpose(0, 1)
    return blocks_k, blocks_v


def _chunk_keys(c: int, r: int, blocks_k, blocks_v, win_k, win_v, n_win: int):
    """Chunk c's keys and values: its r retrieved blocks, then n_win window blocks  # [1, Hkv, r + n_win, S, d]"""
    k = blocks_k.shape[2]
    keys = torch.cat([blocks_k[c, :, k - r :], win_k[c, :, :n_win]], dim=1)[None]
    values = torch.cat([blocks_v[c, :, k - r :], win_v[c, :, :n_win]], dim=1)[None]
    return keys, values


def _attend_per_block(q_win, blocks_k, blocks_v, win_k, win_v, plan: StepPlan, dtype: torch.dtype,
                      reference: bool) -> torch.Tensor:
    """Grouped softmax of each chunk's own query rows, one query block at a
    time over the key blocks up to it, which skips the hidden upper triangle
    and keeps the score tensors in cache. One chunk per call, so a chunk's
    result never depends on which chunks share its step (a streamed ingest
    is byte-identical to one feed). reference: float32 matmuls
    (grouped_attention_inference, the serial engine's); else
    last_block_attention in the model dtype (a CPU's fast path).
    Returns [C, H, W, d] (rows outside the chunk: garbage)."""
    S = plan.S
    out = torch.empty_like(q_win)
    buffers = ScoreBuffers()
    for c, r in enumerate(plan.r):
        keys, values = _chunk_keys(c, r, blocks_k, blocks_v, win_k, win_v, -(-plan.win_len[c] // S))
        w0 = plan.opens[c]  # rows before it are the inherited open block's: not this chunk's queries
        while w0 < plan.win_len[c]:
            w1 = min((w0 // S + 1) * S, plan.win_len[c])
            n = r + w0 // S + 1  # key blocks up to the queries' own
            q = q_win[c : c + 1, :, w0:w1]
            if reference:
                offsets = plan.row_offset[w0:w1]
                out[c : c + 1, :, w0:w1] = grouped_attention_inference(q, keys[:, :, :n], values[:, :, :n],
                                                                       torch.full_like(offsets, n - 1), offsets)
            else:
                out[c : c + 1, :, w0:w1] = last_block_attention(q, keys[:, :, :n], values[:, :, :n],
                                                                plan.row_offset[w0:w1], dtype, buffers)
            w0 = w1
    return out


def _attend_batched(q_win, blocks_k, blocks_v, win_k, win_v, plan: StepPlan, budget: PrefillBudget,
                    dtype: torch.dtype) -> torch.Tensor:
    """Grouped softmax of every chunk's window rows in tiles of
    budget.query_tile query blocks, batches of chunks at once (a GPU's form,
    compiled). Chunks retrieving fewer than k blocks (only at the start of
    a context) run separately with their r, so no call needs a per-chunk
    block mask; window padding needs none either, as it lies after every
    real query. Returns [C, H, W, d] (rows outside the chunk: garbage)."""
    C, H, W, d = q_win.shape
    k, S = plan.k, plan.S
    out = torch.empty_like(q_win)
    for g_lo, g_hi in _runs(plan.r):
        r = plan.r[g_lo]
        rows = max(plan.win_len[g_lo:g_hi])
        n_win = -(-rows // S)
        tile = min(budget.query_tile, n_win) * S
        cost = H * tile * (r + n_win) * S  # the largest tile's score tensor, per chunk
        for lo, hi in batches([cost] * (g_hi - g_lo), budget.attention_elements):
            lo, hi = g_lo + lo, g_lo + hi
            keys = torch.cat([blocks_k[lo:hi, :, k - r :], win_k[lo:hi, :, :n_win]], dim=2)  # [B, Hkv, r + n_win, S, d]
            values = torch.cat([blocks_v[lo:hi, :, k - r :], win_v[lo:hi, :, :n_win]], dim=2)
            for w0 in range(0, rows, tile):
                w1 = min(w0 + tile, rows)
                n = r + -(-w1 // S)  # key blocks up to the tile's last query block
                out[lo:hi, :, w0:w1] = _GROUPED(
                    budget.compile, q_win[lo:hi, :, w0:w1], keys[:, :, :n], values[:, :, :n], r + plan.row_block[w0:w1],
                    plan.row_offset[w0:w1], None, False, dtype)
    return out


def _attend_recorded(q_win, blocks_k, blocks_v, win_k, win_v, ids, plan: StepPlan | FixedStep,
                     evidence_rows: list[int] | None) -> tuple[torch.Tensor, Evidence]:
    """The reference grouped softmax of one chunk's rows over its whole window
    at once, with every slot's probability (answer evidence): evidence_rows
    (offsets from the chunk's first new token) of them, or all rows of a
    fixed plan's token. Returns [1, H, W, d] and the Evidence."""
    S, r = plan.S, plan.r[0]
    lo, hi = plan.chunk_rows(0)
    n_win = plan.n_win_blocks
    keys, values = _chunk_keys(0, r, blocks_k, blocks_v, win_k, win_v, n_win)
    w = plan.row_block[lo:hi] * S + plan.row_offset[lo:hi]  # the rows' window positions
    out = torch.empty_like(q_win)
    out[:, :, lo:hi], probs = grouped_attention_inference(q_win[:, :, lo:hi], keys, values, r + w // S, w % S,
                                                          slot_probs=True)
    T = hi - lo
    probs = probs[0].unflatten(1, (-1, T))  # [Hkv, G, T, r + n_win, S]
    if evidence_rows is not None:
        probs = probs[:, :, evidence_rows]
    # the retrieved blocks, then the window's, from the open block on
    read = plan.n_before[0] + torch.arange(n_win, device=ids.device).expand(ids.shape[1], -1)
    read = torch.cat([ids[0, :, ids.shape[2] - r :], read], dim=1)
    return out, Evidence(read, probs.flatten(1, 2))


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) runs of equal consecutive values."""
    out, lo = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[lo]:
            out.append((lo, i))
            lo = i
    return out


# the batched (GPU) grouped softmax: compiled, its passes over the score tensor fuse
_GROUPED = MaybeCompiled(grouped_attention_inference)
