"""One decoding step in fixed shapes, replayed as a CUDA graph.

Why: a token step runs about 115 kernels per layer, 3,500 for the default
model, and from Python each costs ~25 us of host time, so an H200 decoded at
~75 ms/token while its own work took ~8 ms. A CUDA graph launches them all
at once. A graph needs fixed shapes and fixed addresses, so the step is
step.landmark_layer over every layer with a step.FixedStep plan: the new
token's slot p in its layer cache's fixed open-block buffer and the block
count n are device scalars, the landmark keys of the stores' whole capacity
are scored (those past n masked) and the k best are gathered from
device-resident stores. It serves the common step only: one ordinary token
that does not close its block, blocks on the device (`--kv-offload device`,
or auto while they fit) in the compute dtype, no mapped prefix, at least k
blocks stored. It also returns answer evidence (the attention share of each
slot of the retrieved blocks and the open block), which the engine records
as it does the eager step's. Everything else (a token and the landmark
closing its block, prefill, host-resident blocks) takes the engine's eager
step. The graph is captured again when a store's buffers move (they grow by
doubling). The engine, not this module, advances its caches and trace.

tests/test_graph_decode.py checks the eager form of this step against the
serial engine on CPU, and the captured form on CUDA.
"""

from __future__ import annotations

import warnings

import torch

from .cache import LandmarkCache
from .landmarks import LandmarkConfig, forbid_landmark
from .plan import PrefillBudget
from .positions import RopeTables
from .step import FixedStep, Kernels, landmark_layer


class GraphDecoder:
    """Fixed-shape token steps of a LlamaForCausalLM with landmark settings
    config, over the layer caches each step is given; capture=False runs
    the same step eagerly (what the CPU tests compare)."""

    def __init__(self, model, config: LandmarkConfig, capture: bool = True):
        self.model, self.llama, self.config = model, model.model, config
        self.capture = capture
        mc, weight = model.config, self.llama.embed_tokens.weight
        n_heads, n_kv = mc.num_attention_heads, mc.num_key_value_heads
        S, k, dev = config.slot, config.top_k, weight.device
        L = len(self.llama.layers)
        self.plan = FixedStep(config.block_size, k, dev)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.ids = torch.zeros(L, n_kv, k, dtype=torch.long, device=dev)
        self.scores = torch.zeros(L, n_kv, k, device=dev)
        # each retrieved and the open block's slots' share of the query's attention, for answer evidence
        self.slot_probs = torch.zeros(L, n_kv, n_heads // n_kv, k + 1, S, device=dev)  # [L, Hkv, G, k+1, S]
        self.logits = torch.zeros(model.lm_head.out_features, device=dev)
        self.rope = RopeTables.build(self.llama.rotary_emb, weight[:1], weight.dtype, config, S)
        self.graph = None
        self.broken = False  # capture failed: the engine decodes eagerly
        self.buffers = None  # the cache buffers the graph was captured on
        self.caches: list[LandmarkCache] = []  # this step's (what the graph reads and writes)
        self.kernels = None

    def can_step(self, stream: list[int], caches: list[LandmarkCache]) -> bool:
        """Whether this decoder serves feeding stream (positions, landmarks
        included) after caches: one token closing no block, caches with at
        least k blocks, held on the device in the compute dtype, none mapped."""
        stores = [c.store for c in caches]
        return (not self.broken and len(stream) == 1 and stores[0].offload == "device"
                and all(s.kv_dtype == s.dtype for s in stores) and len(stores[0]) >= self.config.top_k
                and all(s.landmark_keys.n_base == 0 and s.n_frozen == 0 for s in stores)
                and len({s.landmark_keys.data.shape[0] for s in stores}) == 1)

    def step(self, token: int, caches: list[LandmarkCache], budget: PrefillBudget
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Feeding token after caches (see can_step): its keys/values are
        written into the caches' open blocks, which the caller then advances
        (LandmarkCache.advance). Returns the logits [vocab], block ids and
        scores [L, Hkv, k] and slot probabilities [L, Hkv, G, k+1, S] (this
        decoder's buffers: copy what you keep), or None (nothing written) if
        the graph cannot be captured."""
        self.caches, self.kernels = caches, Kernels(budget, reference=True)
        self.token.fill_(token)
        self.plan.set(caches[0].open_len, caches[0].n_blocks)
        if not self.capture:
            self._forward()
        else:
            buffers = [(c.store.landmark_keys.data.data_ptr(), c.store.landmark_keys.data.shape[0],
                        c.store.like_first.data.data_ptr(), c.store.keys.codes.data.data_ptr(),
                        c.store.values.codes.data.data_ptr(), c.open_keys.data_ptr(), c.open_values.data_ptr())
                       for c in caches]
            if buffers != self.buffers:
                try:
                    self._capture()
                except Exception as err:  # noqa: BLE001 - any failure: the eager step computes the same
                    self.broken = True
                    warnings.warn(f"CUDA graph capture of the decoding step failed, decoding eagerly: {err}")
                    return None
                self.buffers = buffers
            self.graph.replay()
        return self.logits.clone(), self.ids, self.scores, self.slot_probs

    def _capture(self) -> None:
        """Warm up on a side stream (the warm-up computes this very step, so
        its writes are the ones the replay makes), then capture."""
        device = self.token.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._forward()

    def _forward(self) -> None:
        """step.landmark_layer over every layer for the plan's one token,
        writing only into this decoder's buffers and the caches' open-block
        buffers at slot p."""
        h = self.llama.embed_tokens(self.token)  # [1, D]
        for li, (layer, cache) in enumerate(zip(self.llama.layers, self.caches)):
            h, ids, scores, seen = landmark_layer(li, layer, h, cache, self.plan, self.rope, self.kernels)
            self.ids[li].copy_(ids[0])
            self.scores[li].copy_(scores[0])
            self.slot_probs[li].copy_(seen.probs)  # [Hkv, G, k+1, S]
        logits = self.model.lm_head(self.llama.norm(h))[0].float()
        self.logits.copy_(forbid_landmark(logits, self.config.landmark_id))
