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

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
import torch.nn.functional as F

from . import landmark_scoring
from .cache import LandmarkCache
from .grouped_attention import ScoreBuffers, grouped_attention_inference, last_block_attention
from .landmarks import forbid_landmark, insert_landmarks
from .positions import RopeTables, rotate, shared_slot_blocks
from .retrieval import RetrievalStep, landmark_probs, top_blocks

if TYPE_CHECKING:
    from .landmark_engine import LandmarkEngine


@dataclass(frozen=True)
class PrefillBudget:
    """Bounds for one layer-major pass.

    positions: stream positions per super-chunk (activations, window copies);
    score_elements / attention_elements: float32 elements of one batched
    landmark-scoring / grouped-softmax score tensor; query_tile: query blocks
    per grouped-softmax call (1 skips the hidden upper triangle and keeps a
    CPU's score tensors in cache; on an H200, 4 read 131k tokens at 110k
    tok/s against 88k for whole windows, which compute the hidden triangle
    too); row_tile: tokens per norm, projection and MLP call (the MLP's
    hidden layer is the widest activation; on a CPU, 2,048 rows keep a tile's
    elementwise passes in cache, where whole 32k-token activations made the
    RMSNorms and the SiLU a third of a 12k-token profile);
    batched_scoring: score many chunks per call (_select_batched, a GPU
    wants few large calls) rather than one chunk's own query rows at a time
    (_select_per_chunk, a CPU's fewest passes over the scores);
    compile: fuse the batched scoring with torch.compile (plain_best_rows).
    """

    positions: int
    score_elements: int
    attention_elements: int
    query_tile: int
    row_tile: int
    batched_scoring: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, device: torch.device, small: bool = False) -> PrefillBudget:
        """small: a fixed GPU working set (--kv-offload cpu: the user keeps the
        GPU's memory for the weights and landmark keys), at some speed."""
        if device.type == "cuda":
            if small:  # 64k positions: ~1-2 GiB of activations and score tensors whatever the length
                return cls(positions=1 << 16, score_elements=1 << 26, attention_elements=1 << 26, query_tile=4,
                           row_tile=1 << 14, batched_scoring=True, compile=True)
            # A quarter of the free memory for activations at ~10 KiB a position
            # (SmolLM2-135M in bf16): about 2M positions on an 80 GiB card.
            free, _ = torch.cuda.mem_get_info(device)
            return cls(positions=max(1 << 16, free // 4 // 10240), score_elements=1 << 28,
                       attention_elements=1 << 28, query_tile=4, row_tile=1 << 17, batched_scoring=True,
                       compile=True)
        return cls(positions=1 << 16, score_elements=1 << 20, attention_elements=1 << 22, query_tile=1,
                   row_tile=1 << 11)


class Chunk(NamedTuple):
    """One step of the serial schedule: `length` stream positions from `start`."""

    start: int
    length: int


def plan_chunks(n: int, open_len: int, chunk: int, slot: int) -> list[Chunk]:
    """The serial engine's chunks for a stream of n positions fed after an
    open block of open_len (LandmarkEngine.feed's loop, without the model)."""
    out, start, p = [], 0, open_len
    while start < n:
        length = min(max(chunk - p, 1), n - start)
        out.append(Chunk(start, length))
        start += length
        p = (p + length) % slot
    return out


def super_chunks(chunks: list[Chunk], positions: int) -> list[list[Chunk]]:
    """Consecutive runs of whole chunks of at most `positions` (at least one chunk each)."""
    runs: list[list[Chunk]] = [[]]
    used = 0
    for c in chunks:
        if runs[-1] and used + c.length > positions:
            runs.append([])
            used = 0
        runs[-1].append(c)
        used += c.length
    return runs


def batches(costs: list[int], budget: int) -> list[tuple[int, int]]:
    """Split items with the given costs into consecutive [lo, hi) runs whose
    cost stays within budget (an item over budget gets a run of its own)."""
    out, lo, used = [], 0, 0
    for i, c in enumerate(costs):
        if i > lo and used + c > budget:
            out.append((lo, i))
            lo, used = i, 0
        used += c
    if lo < len(costs):
        out.append((lo, len(costs)))
    return out


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
        self.n_old = [shared_slot_blocks(nb, k) for nb in self.blocks_before]  # landmarks scored at slot 0
        self.n_win_blocks = max(-(-w // S) for w in self.win_len)
        self.W = self.n_win_blocks * S  # window rows per chunk, padded
        C, W = len(chunks), self.W

        a = torch.tensor(self.win_start, device=dev)
        opens_t = torch.tensor(opens, device=dev)
        lens = torch.tensor(self.win_len, device=dev)
        nb = torch.tensor(self.blocks_before, device=dev)
        w = torch.arange(W, device=dev)
        # window blocks of each chunk, in cache blocks  # [C, n_win_blocks]
        self.win_blocks = (a[:, None] // S + torch.arange(self.n_win_blocks, device=dev)).clamp(max=self.n_cache_blocks - 1)
        # which new token gives the query of window row w (rows outside the chunk: any; discarded)  # [C, W]
        self.q_rows = (a[:, None] - p0 + w).clamp(0, n_positions - 1)
        # rows that are this chunk's own queries, for chunks with something to retrieve  # [C, W]
        self.scoring_rows = (w >= opens_t[:, None]) & (w < lens[:, None]) & (nb[:, None] > 0)
        self.old_limit = torch.tensor(self.n_old, device=dev)  # [C]
        self.recent = nb[:, None] - k + torch.arange(k, device=dev)  # [C, k] ids of the k most recent blocks
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
    select = _select_batched if budget.batched_scoring else _select_per_chunk
    ids, scores = select(engine, cache, q_win, layout, rope, budget)
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


def _stored_landmarks(cache: LandmarkCache, rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What both selections score against: the layer's landmark keys
    [Hkv, n, d], the same rotated into slot 0 (where every landmark older than
    a chunk's k most recent sits), and which equal the first [Hkv, n] (layer 0,
    where all are the landmark embedding's, see _select_batched)."""
    lm = cache.landmark_keys()  # [Hkv, n, d]
    return lm, rotate(lm, *rope.shared_landmarks), (lm == lm[:, :1]).all(-1)


def _select_per_chunk(engine: LandmarkEngine, cache: LandmarkCache, q_win: torch.Tensor, layout: _Layout, rope: RopeTables,
                      budget: PrefillBudget) -> tuple[torch.Tensor, torch.Tensor]:
    """_select_batched's result, one chunk at a time: each chunk's own query
    rows (no masked rows) against exactly the blocks before it (no masked
    blocks), in row tiles of at most budget.score_elements scores, through
    the serial engine's landmark_probs. Fewest passes over the scores, which
    on a CPU is what a long context's prefill time is made of."""
    C, H, W, d = q_win.shape
    Hkv, k = engine.n_kv, layout.k
    group = H // Hkv
    lm, lm_old, like_first = _stored_landmarks(cache, rope)
    ids_out = torch.full((C, Hkv, k), -1, dtype=torch.long, device=q_win.device)
    scores_out = torch.zeros(C, Hkv, k, device=q_win.device)
    for c in range(C):
        nb, r, n_old = layout.blocks_before[c], layout.r[c], layout.n_old[c]
        if not r:
            continue
        n_recent = nb - n_old  # the chunk's k most recent blocks (fewer at the start), at slots k - n_recent + 1..k
        cos, sin = (t[k - n_recent :] for t in rope.recent_landmarks)
        keys = torch.cat([lm_old[:, :n_old], rotate(lm[:, n_old:nb], cos, sin)], dim=1)  # [Hkv, nb, d], by block id
        rows = q_win[c, :, layout.opens[c] : layout.win_len[c]]  # the chunk's own queries  # [H, Wc, d]
        qg = rows.reshape(Hkv, group * rows.shape[1], d)
        tile = max(1, budget.score_elements // (Hkv * nb))
        best = torch.stack([landmark_probs(qg[:, lo : lo + tile], keys).amax(dim=1)
                            for lo in range(0, qg.shape[1], tile)]).amax(dim=0)  # [Hkv, nb]
        # Layer 0's old landmark keys are all the landmark embedding's: one
        # score for all (see _select_batched).
        best[:, :n_old] = torch.where(like_first[:, :n_old], best[:, :1], best[:, :n_old])
        block, top = top_blocks(best, r)  # [Hkv, r]
        ids_out[c, :, k - r :] = block
        scores_out[c, :, k - r :] = top
    return ids_out, scores_out


def _select_batched(engine: LandmarkEngine, cache: LandmarkCache, q_win: torch.Tensor, layout: _Layout, rope: RopeTables,
                    budget: PrefillBudget) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k blocks per chunk and key/value head, as the serial engine's _select
    scores them: softmax over the blocks before the chunk of q . landmark / sqrt(d),
    max over the chunk's queries and the head's group.

    Returns ids [C, Hkv, k] (ascending, the k - r_c missing ones first as -1) and
    their scores [C, Hkv, k] (0 where missing). Landmarks older than the chunk's
    k most recent all sit in slot 0, so one rotation serves every chunk for
    them; the recent k are gathered and rotated per chunk. On CUDA with
    Triton, landmark_scoring.best_rows scores those old landmarks without
    storing the scores; the matmul and landmark_scoring.plain_best_rows are
    the reference.
    """
    C, H, W, d = q_win.shape
    Hkv, k = engine.n_kv, layout.k
    group = H // Hkv
    lm, lm_old, like_first = _stored_landmarks(cache, rope)
    ids_out = torch.empty(C, Hkv, k, dtype=torch.long, device=q_win.device)
    scores_out = torch.empty(C, Hkv, k, device=q_win.device)
    if not max(layout.r):  # nothing stored before any chunk
        return ids_out.fill_(-1), scores_out.zero_()
    # The fused kernels (landmark_scoring) never hold the [B, Hkv, G*W, n_old]
    # scores: a chunk then costs its recent scores and its per-block rows
    # (best_old, top_blocks' 64-bit keys), so a batch takes many more chunks.
    fused = landmark_scoring.usable(q_win)
    costs = [H * W * (k + 1) + 12 * Hkv * (n_old + k) if fused else H * W * (n_old + k) for n_old in layout.n_old]
    for lo, hi in batches(costs, budget.score_elements):
        n_old = layout.n_old[hi - 1]  # the batch's largest
        qg = q_win[lo:hi].reshape(hi - lo, Hkv, group * W, d)  # [B, Hkv, G*W, d]
        too_recent = torch.arange(n_old, device=lm.device) >= layout.old_limit[lo:hi, None]  # [B, n_old]
        recent = layout.recent[lo:hi]  # [B, k]
        lm_recent = rotate(lm[:, recent.clamp(min=0)].transpose(0, 1), *rope.recent_landmarks)  # [B, Hkv, k, d]
        s_recent = qg @ lm_recent.transpose(-1, -2)  # [B, Hkv, G*W, k]
        rows = layout.scoring_rows[lo:hi, None, None].expand(-1, 1, group, -1).reshape(hi - lo, 1, group * W)
        if fused:
            best_old, recent_best = landmark_scoring.best_rows(
                qg, lm_old[:, :n_old], s_recent, layout.old_limit[lo:hi], recent < 0, rows, d**0.5)
        else:
            s_old = qg @ lm_old[:, :n_old].transpose(-1, -2)  # [B, Hkv, G*W, n_old]
            best_old, recent_best = _BEST_ROWS(budget.compile, s_old, s_recent, too_recent, recent < 0, rows, d**0.5)
            del s_old
        del s_recent
        # Layer 0's landmark keys are all the landmark embedding's: give them
        # bitwise one score (a batched matmul may differ in the last bit by
        # column), so top_blocks' recency rule picks as the serial engine does.
        best_old = torch.where(like_first[:, :n_old] & ~too_recent[:, None], best_old[..., :1], best_old)
        # log-probabilities by block id, the recent k placed at their ids  # [B, Hkv, n_old + k]
        best = F.pad(best_old, (0, k), value=float("-inf"))
        best.scatter_reduce_(2, recent.clamp(min=0)[:, None].expand(-1, Hkv, -1), recent_best, "amax")
        block, top = top_blocks(best, k)  # [B, Hkv, k]
        key, order = torch.where(top > float("-inf"), block, -1).sort(dim=-1)
        ids_out[lo:hi] = key
        scores_out[lo:hi] = top.gather(2, order).exp()
    return ids_out, scores_out


class _MaybeCompiled:
    """A function run through torch.compile when asked, else eagerly; if
    compiling or running the compiled form fails (no Triton, an unsupported
    op), it warns once and stays eager, which computes the same."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = False

    def __call__(self, use_compile: bool, *args):
        if use_compile and not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                with warnings.catch_warnings():  # inductor's note on how it fused a softmax: not the user's concern
                    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled")
                    return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any failure: the eager form is the reference
                self.failed = True
                warnings.warn(f"torch.compile of {self.fn.__name__} failed, running it eagerly: {e}")
        return self.fn(*args)


_BEST_ROWS = _MaybeCompiled(landmark_scoring.plain_best_rows)
# the batched (GPU) grouped softmax: compiled, its passes over the score tensor fuse
_GROUPED = _MaybeCompiled(grouped_attention_inference)


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
