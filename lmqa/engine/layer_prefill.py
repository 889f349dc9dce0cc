"""Layer-major prefill: a whole input (or a super-chunk of it) one layer at a time.

Why: the chunk-serial engine (LandmarkEngine._step) walks one chunk of about
640 positions through every layer with dozens of small ops per layer, so a GPU
idles on kernel launches and a CPU spends most of its time in op overhead. But
chunk c at layer l reads only layer l's keys and values of earlier positions,
and those depend only on layer l-1. So each layer can project every token at
once, store every block they close, and then score, select and attend for all
chunks in a few batched ops whose batch dimension is the chunk.

The result equals the serial engine's, chunk by chunk (tests/test_layer_prefill.py):
  * the chunk schedule is the serial loop's (plan_chunks);
  * a chunk's window is the open block it inherits plus its own tokens,
    placed after k + 1 block slots;
  * it scores only landmarks of blocks closed before it starts (a causal mask
    over the blocks this layer has just stored), the k most recent of those at
    their own slots 1..k and older ones sharing slot 0;
  * it retrieves r = min(k, blocks before it) blocks into the last r slots;
  * store contents, open block, token count and trace end as the serial
    engine leaves them.

Memory is bounded by PrefillBudget: super-chunks of whole chunks sized to it,
and within a layer, batches of chunks sized to the score tensors. Nothing in
the layer loop reads a device tensor on the host, so on CUDA the host only
queues work (except gathers from a host block store, one per layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .cache import LandmarkCache
from .compiled import MaybeCompiled
from .grouped_attention import ScoreBuffers, grouped_attention_inference, last_block_attention
from .landmarks import forbid_landmark, insert_landmarks
from .plan import Chunk, batches, plan_chunks, super_chunks
from .positions import RopeTables, rotate
from .retrieval import RetrievalStep, select_blocks

if TYPE_CHECKING:
    from .landmark_engine import LandmarkEngine


class _Layout:
    """Where every chunk of a super-chunk sits, on the host and as device index tensors.

    "Cache coordinates": the inherited open block's p0 positions followed by
    the super-chunk's N positions, so block m of them is positions
    [m*S, (m+1)*S) and a chunk's window starts at a block boundary.
    """

    def __init__(self, engine: LandmarkEngine, chunks: list[Chunk], n_positions: int):
        cfg, dev = engine.config, engine.device
        S, k = cfg.slot, cfg.top_k
        self.S, self.k = S, k
        p0, n0 = engine.open_len, engine.n_blocks
        first = chunks[0].start
        self.P = p0 + n_positions  # cache positions
        self.n_cache_blocks = -(-self.P // S)
        self.closed = self.P // S
        # per chunk (host): window start (a block boundary) and length, open part, blocks before it
        self.opens = opens = [(p0 + c.start - first) % S for c in chunks]
        self.win_start = [p0 + c.start - first - p for c, p in zip(chunks, opens)]
        self.win_len = [p + c.length for c, p in zip(chunks, opens)]
        self.blocks_before = [n0 + a // S for a in self.win_start]
        self.r = [min(k, nb) for nb in self.blocks_before]
        self.n_win_blocks = max(-(-w // S) for w in self.win_len)
        self.W = self.n_win_blocks * S  # window rows per chunk, padded
        C, W = len(chunks), self.W

        a = torch.tensor(self.win_start, device=dev)
        w = torch.arange(W, device=dev)
        # window blocks of each chunk, in cache blocks  # [C, n_win_blocks]
        self.win_blocks = (a[:, None] // S + torch.arange(self.n_win_blocks, device=dev)).clamp(max=self.n_cache_blocks - 1)
        # which new token gives the query of window row w (rows outside the chunk: any; discarded)  # [C, W]
        self.q_rows = (a[:, None] - p0 + w).clamp(0, n_positions - 1)
        # each new token's row in the [C * W] window rows  # [N]
        x = torch.arange(p0, self.P, device=dev)
        starts = torch.tensor([p0 + c.start - first for c in chunks], device=dev)
        chunk_of = torch.searchsorted(starts, x, right=True) - 1
        self.token_rows = chunk_of * W + (x - a[chunk_of])
        self.row_block = w // S  # [W]
        self.row_offset = w % S


@torch.inference_mode()
def feed(engine: LandmarkEngine, ids: list[int], progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """LandmarkEngine.feed, layer-major: same arguments, same result and state."""
    cfg = engine.config
    stream = insert_landmarks(ids, cfg.block_size, cfg.landmark_id, filled=engine.open_len)
    last_ordinary = len(stream) - 1 - (stream[-1] == cfg.landmark_id)
    chunks = plan_chunks(len(stream), engine.open_len, cfg.prefill_chunk, cfg.slot)
    logits = None
    for run in super_chunks(chunks, engine.prefill_budget.positions):
        lo, hi = run[0].start, run[-1].start + run[-1].length
        want = last_ordinary - lo if lo <= last_ordinary < hi else None
        out = _super_chunk(engine, stream[lo:hi], run, want, progress)
        if out is not None:
            logits = out
    return logits


def _super_chunk(engine: LandmarkEngine, stream: list[int], chunks: list[Chunk], logits_at: int | None,
                 progress: Callable[[int], None] | None) -> torch.Tensor | None:
    cfg = engine.config
    layout = _Layout(engine, chunks, len(stream))
    h = engine.llama.embed_tokens(torch.tensor(stream, device=engine.device))  # [N, D]
    rope = RopeTables.build(engine.llama.rotary_emb, h, engine.dtype, cfg, layout.W)
    layers = engine.llama.layers
    L, C, k = len(layers), len(chunks), cfg.top_k
    trace_ids = torch.empty(L, C, engine.n_kv, k, dtype=torch.long, device=engine.device)
    trace_scores = torch.empty(L, C, engine.n_kv, k, device=engine.device)
    done = 0
    for li, layer in enumerate(layers):
        h = _layer(engine, li, layer, h, layout, rope, trace_ids[li], trace_scores[li])
        if progress is not None:
            step = len(stream) * (li + 1) // L - done
            done += step
            progress(step)

    _record_trace(engine, stream, chunks, layout, trace_ids, trace_scores)
    if logits_at is None:
        return None
    logits = engine.model.lm_head(engine.llama.norm(h[logits_at : logits_at + 1]))[0].float()
    return forbid_landmark(logits, cfg.landmark_id)


def _layer(engine: LandmarkEngine, li: int, layer, h: torch.Tensor, layout: _Layout, rope: RopeTables,
           ids_out: torch.Tensor, scores_out: torch.Tensor) -> torch.Tensor:
    """One decoder layer for every chunk of a super-chunk; stores the blocks
    it closes and advances the open block. Returns the new hidden states."""
    attn, budget = layer.self_attn, engine.prefill_budget
    N, H, Hkv, d, S = h.shape[0], engine.n_heads, engine.n_kv, engine.head_dim, layout.S
    # Projections in row tiles, except at layer 0: a matmul may round a row
    # differently in tiles of other heights, and layer 0's landmark keys must
    # stay bitwise equal (see _stored_landmarks).
    tile = budget.row_tile if li else N
    q = h.new_empty(N, H, d, dtype=engine.dtype)
    kv_new = [h.new_empty(N, Hkv, d, dtype=engine.dtype) for _ in range(2)]
    for lo in range(0, N, tile):
        x = layer.input_layernorm(h[lo : lo + tile])
        for proj, dest in zip((attn.q_proj, attn.k_proj, attn.v_proj), (q, *kv_new)):
            dest[lo : lo + tile] = proj(x).view(-1, *dest.shape[1:])
    del x
    # cache = inherited open block + new tokens, cut into whole blocks  # [n_cache_blocks, Hkv, S, d]
    # (closed ones stored; the layer's selection scores only those before each chunk)
    cache = engine.caches[li]
    cache_k, cache_v = cache.update_and_fetch(*kv_new)
    del kv_new

    # queries in window layout, rotated at window positions  # [C, H, W, d]
    q_win = rotate(q[layout.q_rows].transpose(1, 2), *rope.window)
    del q
    ids, scores = select_blocks(q_win, cache.landmark_keys(), layout.blocks_before, layout.k, rope.landmarks,
                                cache.like_first(), list(zip(layout.opens, layout.win_len)), budget)
    ids_out.copy_(ids)
    scores_out.copy_(scores)
    out_win = _attend(engine, cache, cache_k, cache_v, q_win, ids, layout, rope)
    del q_win, cache_k, cache_v
    # each token's output row, heads concatenated  # [N, H * d]
    out = out_win.transpose(1, 2).reshape(-1, H * d)[layout.token_rows].to(h.dtype)
    for lo in range(0, N, budget.row_tile):
        part = h[lo : lo + budget.row_tile]
        part += attn.o_proj(out[lo : lo + budget.row_tile])
        part += layer.mlp(layer.post_attention_layernorm(part))
    return h


# the batched (GPU) grouped softmax: compiled, its passes over the score tensor fuse
_GROUPED = MaybeCompiled(grouped_attention_inference)


def _attend(engine: LandmarkEngine, cache: LandmarkCache, cache_k: torch.Tensor, cache_v: torch.Tensor, q_win: torch.Tensor,
            ids: torch.Tensor, layout: _Layout, rope: RopeTables) -> torch.Tensor:
    """Grouped softmax of every chunk's window rows over its retrieved blocks
    and its window; returns [C, H, W, d] (rows outside the chunk: garbage).

    Chunks retrieving fewer than k blocks (only at the start of a context)
    run separately with their r, so no call needs a per-chunk block mask;
    window padding needs none either, as it lies after every real query.
    """
    C, H, W, d = q_win.shape
    Hkv, k, S, budget = engine.n_kv, layout.k, layout.S, engine.prefill_budget
    # retrieved blocks, landmark in the last slot, rotated into slots 1..k  # [C, Hkv, k, S, d]
    if max(layout.r):
        rk, rv, rlm = cache.gather(ids.clamp(min=0).transpose(0, 1).reshape(Hkv, C * k))  # [Hkv, C*k, b, d], [Hkv, C*k, d]
        blocks_k = rotate(torch.cat([rk, rlm[:, :, None]], dim=2).view(Hkv, C, k, S, d).transpose(0, 1), *rope.blocks)
        blocks_v = F.pad(rv, (0, 0, 0, 1)).view(Hkv, C, k, S, d).transpose(0, 1)
        del rk, rv, rlm
    else:
        blocks_k = blocks_v = q_win.new_empty(C, Hkv, k, S, d)
    # each chunk's window blocks  # [C, Hkv, n_win_blocks, S, d]
    cos_w, sin_w = (t.view(layout.n_win_blocks, S, d) for t in rope.window)
    win_k = rotate(cache_k[layout.win_blocks].transpose(1, 2), cos_w, sin_w)
    win_v = cache_v[layout.win_blocks].transpose(1, 2)

    out = q_win.new_empty(C, H, W, d)
    if budget.query_tile == 1:
        _attend_per_block(engine, blocks_k, blocks_v, win_k, win_v, q_win, layout, out)
        return out
    for g_lo, g_hi in _runs(layout.r):
        r = layout.r[g_lo]
        rows = max(layout.win_len[g_lo:g_hi])
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
                    budget.compile, q_win[lo:hi, :, w0:w1], keys[:, :, :n], values[:, :, :n], r + layout.row_block[w0:w1],
                    layout.row_offset[w0:w1], None, False, engine.dtype)
    return out


def _attend_per_block(engine: LandmarkEngine, blocks_k: torch.Tensor, blocks_v: torch.Tensor, win_k: torch.Tensor,
                      win_v: torch.Tensor, q_win: torch.Tensor, layout: _Layout, out: torch.Tensor) -> None:
    """_attend for a CPU: each chunk's own query rows one block at a time
    (last_block_attention, matmuls in the model's dtype), which skips the
    hidden upper triangle and keeps the score tensors in cache. One chunk per
    call, so a chunk's result never depends on which chunks share its
    super-chunk (a streamed ingest is byte-identical to one feed)."""
    k, S = layout.k, layout.S
    buffers = ScoreBuffers()
    for c, r in enumerate(layout.r):
        n_win = -(-layout.win_len[c] // S)
        keys = torch.cat([blocks_k[c, :, k - r :], win_k[c, :, :n_win]], dim=1)[None]  # [1, Hkv, r + n_win, S, d]
        values = torch.cat([blocks_v[c, :, k - r :], win_v[c, :, :n_win]], dim=1)[None]
        w0 = layout.opens[c]  # rows before it are the inherited open block's: not this chunk's queries
        while w0 < layout.win_len[c]:
            w1 = min((w0 // S + 1) * S, layout.win_len[c])
            n = r + w0 // S + 1  # key blocks up to the queries' own
            out[c : c + 1, :, w0:w1] = last_block_attention(q_win[c : c + 1, :, w0:w1], keys[:, :, :n], values[:, :, :n],
                                                            layout.row_offset[w0:w1], engine.dtype, buffers)
            w0 = w1


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) runs of equal consecutive values."""
    out, lo = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[lo]:
            out.append((lo, i))
            lo = i
    return out


def _record_trace(engine: LandmarkEngine, stream: list[int], chunks: list[Chunk], layout: _Layout,
                  ids: torch.Tensor, scores: torch.Tensor) -> None:
    """Advance the engine chunk by chunk, with one RetrievalStep per chunk
    that retrieved, as the serial engine records it; one device-to-host copy
    per super-chunk."""
    ids, scores = ids.cpu(), scores.cpu()  # [L, C, Hkv, k]
    k, lm_id, first = layout.k, engine.config.landmark_id, chunks[0].start
    for c, (chunk, r) in enumerate(zip(chunks, layout.r)):
        step = RetrievalStep("chunk" if chunk.length > 1 else "token", engine.n_tokens, ids[:, c, :, k - r :].clone(),
                             scores[:, c, :, k - r :].clone()) if r else None
        piece = stream[chunk.start - first : chunk.start - first + chunk.length]
        engine.advance(len(piece) - piece.count(lm_id), step)
