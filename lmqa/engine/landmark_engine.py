"""Landmark inference engine: chunked prefill and token-by-token decoding with
per-head top-k block retrieval (method page, section 3).

The engine is the model, one LandmarkCache per layer (cache.py), the token
count and the retrieval trace. A feed is planned (plan.py: the serial loop's
chunks, super-chunks of them for a layer-major pass) and each step runs the
one landmark step, step.landmark_layer, over every layer; token steps on
CUDA replay it as a graph (graph_decode.py). The engine alone writes its
count and trace; the step writes only the caches it is given.

Where keys and queries sit (section 3.2.1) is positions.py's rule; how
blocks are chosen and what was read, retrieval.py's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .block_store import LayerBlockStore
from .cache import CacheMark, LandmarkCache
from .graph_decode import GraphDecoder
from .landmarks import LandmarkConfig, forbid_landmark, insert_landmarks
from .offload import AutoOffload
from .plan import Chunk, PrefillBudget, plan_chunks, super_chunks
from .positions import RopeTables
from .retrieval import RetrievalStep, RetrievalTrace
from .step import Kernels, StepPlan, landmark_layer


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
        its budget). prefill: how multi-token feeds run: "layer" (layer-major:
        each layer for all the chunks of a super-chunk, then the next layer)
        or "serial" (chunk by chunk through every layer: the reference, and
        the path any feed shorter than a prefill chunk takes). Both run
        step.landmark_layer; they differ in its plan and attention kernels."""
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
        self.trace = RetrievalTrace()
        self.reset()
        # token steps on CUDA replay a captured graph (graph_decode.py)
        self.decoder = GraphDecoder(model, config) if self.device.type == "cuda" else None

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
            self.decoder = GraphDecoder(self.model, self._config, capture=self.decoder.capture)

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
        cfg = self.config
        stream = insert_landmarks(ids, cfg.block_size, cfg.landmark_id, filled=self.open_len)
        if self.decoder is not None and self.decoder.can_step(stream, self.caches):
            out = self.decoder.step(stream[0], self.caches, self.prefill_budget)
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
        chunks = plan_chunks(len(stream), self.open_len, cfg.prefill_chunk, cfg.slot)
        # Shorter than a prefill chunk (a question, a chat turn), a feed is one
        # chunk either way: serially, it skips compiling layer-major kernels on CUDA.
        # Only the serial steps record evidence or return every position's logits.
        layer_major = self.prefill == "layer" and len(ids) >= cfg.prefill_chunk and not every and self._evidence is None
        steps = super_chunks(chunks, self.prefill_budget.positions) if layer_major else [[c] for c in chunks]
        logits, outs = None, []
        for run in steps:
            lo, hi = run[0].start, run[-1].start + run[-1].length
            piece = stream[lo:hi]
            if every:
                want = [i for i, t in enumerate(piece) if t != cfg.landmark_id] or None
            else:
                want = last_ordinary - lo if lo <= last_ordinary < hi else None
            out = self._step(piece, run, want, not layer_major, progress if layer_major else None)
            if out is not None:
                logits = out
                outs.append(out)
            if progress is not None and not layer_major:
                progress(len(piece))
        return torch.cat(outs) if every else logits

    def _step(self, piece: list[int], chunks: list[Chunk], logits_at: int | list[int] | None, reference: bool,
              progress=None) -> torch.Tensor | None:
        """One step: the chunks of piece (stream positions, landmarks
        included) through every layer (step.landmark_layer), layer by layer;
        reference: the serial engine's attention (float32 matmuls, evidence
        recorded if asked); progress: told each layer's share of the
        positions. Returns the logits after position logits_at (an int or a
        list of them), or None."""
        cfg = self.config
        plan = StepPlan(chunks, len(piece), self.open_len, self.n_blocks, cfg.block_size, cfg.top_k, self.device)
        h = self.llama.embed_tokens(torch.tensor(piece, device=self.device))  # [N, D]
        rope = RopeTables.build(self.llama.rotary_emb, h, self.dtype, cfg, plan.W)
        kernels = Kernels(self.prefill_budget, reference)
        # Evidence (set for short feeds only: a question, answer tokens): every ordinary token's query.
        evidence_rows = [i for i, t in enumerate(piece) if t != cfg.landmark_id] if self._evidence is not None else None
        L, C, k = len(self.caches), len(chunks), cfg.top_k
        trace_ids = torch.empty(L, C, self.n_kv, k, dtype=torch.long, device=self.device)
        trace_scores = torch.empty(L, C, self.n_kv, k, device=self.device)
        done = 0
        for li, (layer, cache) in enumerate(zip(self.llama.layers, self.caches)):
            h, trace_ids[li], trace_scores[li], seen = landmark_layer(li, layer, h, cache, plan, rope, kernels,
                                                                      evidence_rows or None)
            if seen is not None:
                self._evidence.add(*seen)
            if progress is not None:
                share = len(piece) * (li + 1) // L - done
                done += share
                progress(share)
        self._record(piece, chunks, plan.r, trace_ids, trace_scores)
        if logits_at is None:
            return None
        last = self.llama.norm(h[logits_at : logits_at + 1] if isinstance(logits_at, int) else h[logits_at][None])
        logits = self.model.lm_head(last)[0].float()  # [vocab], or [len(logits_at), vocab] for a list
        return forbid_landmark(logits, self.config.landmark_id)

    def _record(self, piece: list[int], chunks: list[Chunk], r: list[int], ids: torch.Tensor,
                scores: torch.Tensor) -> None:
        """Advance chunk by chunk, with one RetrievalStep per chunk that
        retrieved (r of its k); one device-to-host copy per step."""
        ids, scores = ids.cpu(), scores.cpu()  # [L, C, Hkv, k]
        k, lm_id, first = self.config.top_k, self.config.landmark_id, chunks[0].start
        for c, (chunk, r_c) in enumerate(zip(chunks, r)):
            step = RetrievalStep("chunk" if chunk.length > 1 else "token", self.n_tokens,
                                 ids[:, c, :, k - r_c :].clone(), scores[:, c, :, k - r_c :].clone()) if r_c else None
            part = piece[chunk.start - first : chunk.start - first + chunk.length]
            self.advance(len(part) - part.count(lm_id), step)
