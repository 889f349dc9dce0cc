"""Landmark inference engine: chunked prefill and token-by-token decoding with
per-head top-k block retrieval (method page, section 3).

We run our own layer loop over a transformers LlamaForCausalLM and call its
submodules (norms, projections, MLP), so bitsandbytes layers and peft adapters
work unchanged; only attention is ours.

Where keys and queries sit (section 3.2.1) is positions.py's rule; how
blocks are chosen and what was read, retrieval.py's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .block_store import LayerBlockStore
from .cache import CacheMark, LandmarkCache
from .graph_decode import GraphDecoder
from .grouped_attention import blockwise_grouped_attention, grouped_attention_inference
from .landmarks import LandmarkConfig, forbid_landmark, insert_landmarks
from .layer_prefill import feed as layer_major_feed
from .offload import AutoOffload
from .plan import PrefillBudget
from .positions import RopeTables, rotate
from .retrieval import RetrievalStep, RetrievalTrace, select_blocks


class Mark(NamedTuple):
    """A state to roll back to (from snapshot()); also what a context file
    saves: every layer's cache at its mark."""

    n_blocks: int
    n_tokens: int
    n_steps: int
    caches: tuple[CacheMark, ...]  # per layer


class OpenBlocks(NamedTuple):
    """Every layer's open block, [1, Hkv, p, d] views (read-only: see LandmarkEngine.open)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class LandmarkEngine:
    """Holds one context (a LandmarkCache per layer, token count, retrieval
    trace) for a LlamaForCausalLM.

    Its settings (config, prefill, offload, evidence) are read-only
    attributes changed through methods (set_top_k, set_prefill, move_blocks,
    record_evidence), so a change reaches every path, the CUDA graph
    decoder's fixed-size buffers included."""

    def __init__(self, model, config: LandmarkConfig, offload: str = "cpu", kv_dtype: torch.dtype | None = None,
                 prefill: str = "layer", max_device_bytes: int | None = None):
        """kv_dtype: how the block stores keep block keys/values (fp32, fp16,
        bf16 or int8; default: the model's dtype). Attention always computes
        in the model's dtype.

        offload: "cpu", "device" or "auto" (offload.py; max_device_bytes is
        its budget). prefill: how multi-token feeds run: "layer" (layer-major,
        layer_prefill.py) or "serial" (chunk by chunk through every layer: the
        reference, and the path any feed shorter than a prefill chunk takes)."""
        self.set_prefill(prefill)
        self.model = model
        self._config = config
        self._evidence = None
        self.llama = model.model
        mc = model.config
        self.n_heads = mc.num_attention_heads
        self.n_kv = mc.num_key_value_heads
        self.head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // self.n_heads
        self.device = self.llama.embed_tokens.weight.device
        self.dtype = self.llama.embed_tokens.weight.dtype
        self.kv_dtype = kv_dtype or self.dtype
        self.auto_offload = AutoOffload(self.device, max_device_bytes) if offload == "auto" else None
        self._offload = self.auto_offload.initial if self.auto_offload else offload
        self.prefill_budget = PrefillBudget.for_device(self.device, small=offload == "cpu")
        self.tile = 1  # query blocks per attention tile
        self.trace = RetrievalTrace()
        self.reset()
        # token steps on CUDA replay a captured graph (graph_decode.py)
        self.decoder = GraphDecoder(self) if self.device.type == "cuda" else None

    # ----- settings -----
    @property
    def config(self) -> LandmarkConfig:
        return self._config

    @property
    def prefill(self) -> str:
        return self._prefill

    @property
    def offload(self) -> str:
        """Where block keys/values live now: "device" or "cpu" (host memory)."""
        return self._offload

    @property
    def evidence(self):
        """The recorder steps add to (see record_evidence), or None."""
        return self._evidence

    def set_top_k(self, k: int) -> None:
        """Retrieve k blocks per head and step from the next step on. The
        serial and layer-major steps read the config per step; the graph
        decoder's buffers and captured graph are sized for one k, so it is
        built again."""
        if k < 1:
            raise ValueError(f"top_k must be at least 1, not {k}")
        self._config = replace(self._config, top_k=k)
        if self.decoder is not None:
            self.decoder = GraphDecoder(self, capture=self.decoder.capture)

    def set_prefill(self, prefill: str) -> None:
        """How multi-token feeds run from now on: "layer" or "serial" (see __init__)."""
        if prefill not in ("layer", "serial"):
            raise ValueError(f"prefill must be 'layer' or 'serial', not {prefill!r}")
        self._prefill = prefill

    def record_evidence(self, recorder) -> None:
        """From the next step on, steps add their queries' attention mass per
        token of the blocks they read to recorder (lmqa/qa/evidence.py), until
        called with None. For short feeds only (a question, answer tokens)."""
        self._evidence = recorder

    def move_blocks(self, where: str) -> None:
        """Keep block keys/values on the device ("device") or in host memory
        ("cpu") from now on: every store is built again there, same contents."""
        self._offload = where
        self.caches = [cache.moved(where) for cache in self.caches]

    # ----- state -----
    def reset(self) -> None:
        self.caches = [self.new_cache() for _ in self.llama.layers]
        self.n_tokens = 0  # ordinary tokens consumed
        self.trace = RetrievalTrace()

    def new_cache(self, state: dict[str, torch.Tensor] | None = None) -> LandmarkCache:
        """One layer's cache with this engine's settings, optionally holding
        state (named tensors, see LandmarkCache.state)."""
        return LandmarkCache.from_state(self.n_kv, self.config.block_size, self.head_dim, self.dtype, self.device,
                                        self.offload, self.kv_dtype, state)

    def load_state(self, states: list[dict[str, torch.Tensor]], n_tokens: int) -> None:
        """Take over a context saved elsewhere (a context file): one state per
        layer (see LandmarkCache.state) and the ordinary tokens it holds; the
        trace starts empty."""
        if len(states) != len(self.llama.layers):
            raise ValueError(f"{len(states)} layer caches for a {len(self.llama.layers)}-layer model")
        self._take(n_tokens, [self.new_cache(state) for state in states])

    def _take(self, n_tokens: int, caches: list[LandmarkCache]) -> None:
        b = self.config.block_size
        if {(c.n_blocks, c.open_len) for c in caches} != {divmod(n_tokens, b)}:
            raise ValueError(f"layer caches of {sorted({(c.n_blocks, c.open_len) for c in caches})} "
                             f"(blocks, open tokens) do not hold {n_tokens} tokens in blocks of {b}")
        self.caches = caches
        self.n_tokens = n_tokens
        self.trace = RetrievalTrace()

    # Compatibility for lmqa/qa/context_stream.py, which builds stores itself.
    def new_store(self, saved: dict[str, torch.Tensor] | None = None) -> LayerBlockStore:
        """One layer's block store with this engine's settings (see LayerBlockStore)."""
        return self.new_cache(saved).store

    def restore(self, stores: list[LayerBlockStore], open_keys: list[torch.Tensor], open_values: list[torch.Tensor],
                n_tokens: int, trace: RetrievalTrace) -> None:
        """load_state for stores built with new_store: open block keys/values
        are [1, Hkv, p, d] per layer; trace must be empty."""
        if len(stores) != len(self.llama.layers):
            raise ValueError(f"{len(stores)} block stores for a {len(self.llama.layers)}-layer model")
        if trace.steps:
            raise ValueError("a restored context starts with an empty trace")
        self._take(n_tokens, [LandmarkCache(s, k[0], v[0]) for s, k, v in zip(stores, open_keys, open_values)])

    @property
    def stores(self) -> list[LayerBlockStore]:
        """Every layer's block store (read them; the caches write them)."""
        return [cache.store for cache in self.caches]

    @property
    def open(self) -> OpenBlocks:
        """Every layer's open block as [1, Hkv, p, d] views of the caches'
        buffers, which later steps and rollbacks overwrite: copy what you keep."""
        blocks = [cache.open_block() for cache in self.caches]
        return OpenBlocks([k[None] for k, _ in blocks], [v[None] for _, v in blocks])

    @property
    def n_blocks(self) -> int:
        return self.caches[0].n_blocks

    @property
    def open_len(self) -> int:
        return self.caches[0].open_len

    def memory(self) -> dict[str, int]:
        total = {"device": 0, "host": 0}
        for cache in self.caches:
            for where, n in cache.bytes_on().items():
                total[where] += n
        return total

    def snapshot(self) -> Mark:
        """A cheap mark to roll back to (every cache's mark + counters)."""
        return Mark(self.n_blocks, self.n_tokens, len(self.trace.steps), tuple(c.mark() for c in self.caches))

    def rollback(self, mark: Mark) -> None:
        for cache, at in zip(self.caches, mark.caches):
            cache.trim(at)
        self.n_tokens = mark.n_tokens
        del self.trace.steps[mark.n_steps :]

    def advance(self, n_tokens: int, step: RetrievalStep | None = None) -> None:
        """Count n_tokens ordinary tokens as consumed, after recording what
        their step retrieved (step.position: the count before them)."""
        if step is not None:
            self.trace.steps.append(step)
        self.n_tokens += n_tokens

    # ----- feeding tokens -----
    @torch.inference_mode()
    def feed(self, ids: list[int], progress=None, every: bool = False) -> torch.Tensor:
        """Consume ordinary tokens (landmarks are inserted here); return the
        logits [vocab] that follow the last one, or with every=True those
        that follow each of them, [len(ids), vocab] (scoring a whole candidate
        answer in one short feed; its tokens share the chunk's retrieval)."""
        if not ids:
            raise ValueError("nothing to feed")
        if self.auto_offload is not None:
            self.auto_offload.before_feed(self, len(ids))
        # Shorter than a prefill chunk (a question, a chat turn), a feed is one
        # chunk either way: serially, it skips compiling layer-major kernels on CUDA.
        # Only the serial step records evidence or returns every position's logits.
        if self.prefill == "layer" and len(ids) >= self.config.prefill_chunk and not every and self._evidence is None:
            return layer_major_feed(self, ids, progress)
        cfg = self.config
        stream = insert_landmarks(ids, cfg.block_size, cfg.landmark_id, filled=self.open_len)
        if self.decoder is not None and self.decoder.can_step(stream):
            out = self.decoder.step(stream[0])
            if out is not None:
                logits, ids, scores, slot_probs = out
                for cache in self.caches:
                    cache.advance(1)
                if self._evidence is not None:
                    opened = torch.full((self.n_kv, 1), self.n_blocks, dtype=torch.long, device=self.device)
                    for layer_ids, probs in zip(ids, slot_probs):
                        self._evidence.add(torch.cat([layer_ids, opened], dim=1), probs)
                self.advance(1, RetrievalStep("token", self.n_tokens, ids.to("cpu", copy=True),
                                              scores.to("cpu", copy=True)))
                if progress is not None:
                    progress(1)
                return logits[None] if every else logits
        # The stream's last ordinary token is the one whose logits we return;
        # a landmark closing its block may follow it and is causal-invisible to it.
        last_ordinary = len(stream) - 1 - (stream[-1] == cfg.landmark_id)
        logits, outs = None, []
        start = 0
        while start < len(stream):
            room = cfg.prefill_chunk - self.open_len
            piece = stream[start : start + max(room, 1)]
            if every:
                want = [i for i, t in enumerate(piece) if t != cfg.landmark_id] or None
            else:
                want = last_ordinary - start if start <= last_ordinary < start + len(piece) else None
            out = self._step(piece, want)
            if out is not None:
                logits = out
                outs.append(out)
            start += len(piece)
            if progress is not None:
                progress(len(piece))
        return torch.cat(outs) if every else logits

    def _step(self, piece: list[int], logits_at: int | list[int] | None) -> torch.Tensor | None:
        cfg = self.config
        S, k = cfg.slot, cfg.top_k
        ids = torch.tensor(piece, device=self.device)[None]
        T, p = ids.shape[1], self.open_len
        W = p + T
        n_win_blocks = -(-W // S)
        h = self.llama.embed_tokens(ids)
        rope = RopeTables.build(self.llama.rotary_emb, h, self.dtype, cfg, n_win_blocks * S)
        cos_w, sin_w = rope.window
        win_valid = (torch.arange(n_win_blocks * S, device=self.device) < W).view(n_win_blocks, S)
        q_idx = torch.arange(p, W, device=self.device)
        n_before = self.n_blocks
        r = min(k, n_before)
        # Evidence (set for short feeds only: a question, answer tokens): every ordinary token's query.
        evidence_rows = [i for i, t in enumerate(piece) if t != cfg.landmark_id] if self._evidence is not None else []

        step_ids, step_scores = [], []
        for layer, cache in zip(self.llama.layers, self.caches):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, T, self.n_heads, self.head_dim).transpose(1, 2).to(self.dtype)
            kk = attn.k_proj(x).view(T, self.n_kv, self.head_dim).to(self.dtype)
            vv = attn.v_proj(x).view(T, self.n_kv, self.head_dim).to(self.dtype)
            win_k, win_v = cache.update_and_fetch(kk, vv)  # [n_win_blocks, Hkv, S, d]
            q = rotate(q, cos_w[p:W], sin_w[p:W])

            if r:
                ids_r, scores_r = (t[0, :, k - r :] for t in select_blocks(
                    q, cache.landmark_keys(), [n_before], k, rope.landmarks, cache.like_first(),
                    budget=self.prefill_budget))
                rk, rv, rlm = cache.gather(ids_r)  # [Hkv, r, b, d], [Hkv, r, d]
                blocks_k = torch.cat([rk, rlm[:, :, None]], dim=2)
                blocks_v = F.pad(rv, (0, 0, 0, 1))
                blocks_k = rotate(blocks_k, *rope.retrieved(r))
                step_ids.append(ids_r)
                step_scores.append(scores_r)
            else:
                blocks_k = blocks_v = win_k.new_zeros(self.n_kv, 0, S, self.head_dim)
            wk = rotate(win_k.transpose(0, 1), cos_w.view(n_win_blocks, S, -1), sin_w.view(n_win_blocks, S, -1))
            keys = torch.cat([blocks_k, wk], dim=1)[None]
            values = torch.cat([blocks_v, win_v.transpose(0, 1)], dim=1)[None]
            valid = torch.cat([torch.ones(r, S, dtype=torch.bool, device=self.device), win_valid])
            if evidence_rows:
                out, probs = grouped_attention_inference(q, keys, values, r + q_idx // S, q_idx % S, valid,
                                                         slot_probs=True)
                # the retrieved blocks, then the window's, from the open block on
                read = torch.arange(n_before, n_before + n_win_blocks, device=self.device).expand(self.n_kv, -1)
                probs = probs[0].unflatten(1, (-1, T))[:, :, evidence_rows].flatten(1, 2)  # [Hkv, G * rows, N, S]
                self._evidence.add(torch.cat([ids_r, read], dim=1) if r else read, probs)
            else:
                out = blockwise_grouped_attention(q, keys, values, r + q_idx // S, q_idx % S, valid, tile=self.tile)
            out = out.transpose(1, 2).reshape(1, T, self.n_heads * self.head_dim).to(h.dtype)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))

        step = RetrievalStep("chunk" if T > 1 else "token", self.n_tokens, torch.stack(step_ids).cpu(),
                             torch.stack(step_scores).cpu()) if step_ids else None
        self.advance(sum(t != cfg.landmark_id for t in piece), step)
        if logits_at is None:
            return None
        last = self.llama.norm(h[:, logits_at])
        logits = self.model.lm_head(last)[0].float()  # [vocab], or [len(logits_at), vocab] for a list
        return forbid_landmark(logits, self.config.landmark_id)
