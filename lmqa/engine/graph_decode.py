"""One decoding step in fixed shapes, replayed as a CUDA graph.

Why: a token step runs about 115 kernels per layer, 3,500 for the default
model, and from Python each costs ~25 us of host time, so an H200 decoded at
~75 ms/token while its own work took ~8 ms. A CUDA graph launches them all
at once. A graph needs fixed shapes and fixed addresses, so this step:
  * writes the new token's key/value into its layer cache's fixed open-block
    buffer [Hkv, S, d] at slot p, a device scalar (LandmarkCache.write);
    slots past p are hidden by the causal mask;
  * selects blocks through retrieval.select_blocks with the block count n a
    device scalar (its fixed-shape form: the landmark keys of the store's
    whole capacity scored, those past n masked), and gathers the k best
    from device-resident stores.
It serves the common step only: one ordinary token that does not close its
block, blocks on the device (`--kv-offload device`, or auto while they fit)
in the compute dtype, no mapped prefix, at least k blocks stored. It also
returns answer evidence (the attention share of each slot of the retrieved
blocks and the open block) for the engine's recorder, as the eager step
records it. The engine, not this module, advances its caches and trace.
Everything else (a token and the landmark closing its block, prefill,
host-resident blocks) takes the engine's eager step. The
graph is captured again when a store's buffers move (they grow by doubling).

tests/test_graph_decode.py checks the eager form of this step against the
serial engine on CPU, and the captured form on CUDA.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .grouped_attention import grouped_attention_inference
from .landmarks import forbid_landmark
from .positions import RopeTables, rotate
from .retrieval import select_blocks

if TYPE_CHECKING:
    from .landmark_engine import LandmarkEngine


class GraphDecoder:
    """Fixed-shape token steps for one engine; capture=False runs the same
    step eagerly (what the CPU tests compare)."""

    def __init__(self, engine: LandmarkEngine, capture: bool = True):
        self.engine = engine
        self.capture = capture
        e, cfg = engine, engine.config
        S, k, dev = cfg.slot, cfg.top_k, engine.device
        L = len(e.llama.layers)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.p = torch.zeros(1, dtype=torch.long, device=dev)  # the new token's slot in the open block
        self.n = torch.zeros((), dtype=torch.long, device=dev)  # blocks stored
        self.q_block = torch.full((1,), k, dtype=torch.long, device=dev)  # the window follows the k retrieved blocks
        self.ids = torch.zeros(L, e.n_kv, k, dtype=torch.long, device=dev)
        self.scores = torch.zeros(L, e.n_kv, k, device=dev)
        # each retrieved and the open block's slots' share of the query's attention, for answer evidence
        self.slot_probs = torch.zeros(L, e.n_kv, e.n_heads // e.n_kv, k + 1, S, device=dev)  # [L, Hkv, G, k+1, S]
        self.logits = torch.zeros(e.model.lm_head.out_features, device=dev)
        self.rope = RopeTables.build(e.llama.rotary_emb, e.llama.embed_tokens.weight[:1], e.dtype, cfg, S)
        self.graph = None
        self.broken = False  # capture failed: the engine decodes eagerly
        self.buffers = None  # the cache buffers the graph was captured on

    def can_step(self, stream: list[int]) -> bool:
        e = self.engine
        return (not self.broken and len(stream) == 1 and e.offload == "device" and e.kv_dtype == e.dtype
                and e.n_blocks >= e.config.top_k
                and all(c.store.landmark_keys.n_base == 0 and c.store.n_frozen == 0 for c in e.caches)
                and len({c.store.landmark_keys.data.shape[0] for c in e.caches}) == 1)

    def step(self, token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The engine's feed([token]) without its state changes: the new
        token's keys/values are written into the caches' open blocks, and the
        engine advances them (LandmarkCache.advance). Returns the logits
        [vocab], block ids and scores [L, Hkv, k] and slot probabilities
        [L, Hkv, G, k+1, S] (this decoder's buffers: copy what you keep),
        or None (nothing written) if the graph cannot be captured."""
        e = self.engine
        self.token.fill_(token)
        self.p.fill_(e.open_len)
        self.n.fill_(e.n_blocks)
        if not self.capture:
            self._forward()
        else:
            buffers = [(c.store.landmark_keys.data.data_ptr(), c.store.landmark_keys.data.shape[0],
                        c.store.keys.codes.data.data_ptr(), c.store.values.codes.data.data_ptr(),
                        c.open_keys.data_ptr(), c.open_values.data_ptr()) for c in e.caches]
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
        side = torch.cuda.Stream(self.engine.device)
        side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(self.engine.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._forward()

    def _forward(self) -> None:
        """LandmarkEngine._step for one token, in fixed shapes, writing only
        into this decoder's buffers and the caches' open-block buffers at slot p."""
        e, cfg = self.engine, self.engine.config
        S, k, H, Hkv, d = cfg.slot, cfg.top_k, e.n_heads, e.n_kv, e.head_dim
        q_cos, q_sin = (t[self.p] for t in self.rope.window)  # [1, d]
        h = e.llama.embed_tokens(self.token)  # [1, 1, D]
        for li, (layer, cache) in enumerate(zip(e.llama.layers, e.caches)):
            attn, store = layer.self_attn, cache.store
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, 1, H, d).transpose(1, 2).to(e.dtype)  # [1, H, 1, d]
            kk = attn.k_proj(x).view(1, Hkv, d).to(e.dtype)  # [1, Hkv, d]
            vv = attn.v_proj(x).view(1, Hkv, d).to(e.dtype)
            cache.write(kk, vv, self.p)
            q = rotate(q, q_cos, q_sin)

            # every block there is room for, the n stored scored (the buffers: see below)
            ids, scores = select_blocks(q, store.landmark_keys.data.transpose(0, 1), self.n.view(1), k,
                                        self.rope.landmarks, store.like_first.data.transpose(0, 1))
            ids = ids[0]  # [Hkv, k]
            self.ids[li].copy_(ids)
            self.scores[li].copy_(scores[0])
            # the buffers themselves, not store.gather: its view ends at the block count of capture time
            heads = torch.arange(Hkv, device=e.device)[:, None]
            rk, rv = store.keys.codes.data[ids, heads], store.values.codes.data[ids, heads]  # [Hkv, k, b, d]
            rlm = store.landmark_keys.data[ids, heads]  # [Hkv, k, d]
            blocks_k = rotate(torch.cat([rk, rlm[:, :, None]], dim=2), *self.rope.blocks)
            blocks_v = F.pad(rv, (0, 0, 0, 1))
            win_k = rotate(cache.open_keys, *self.rope.window)  # [Hkv, S, d]
            keys = torch.cat([blocks_k, win_k[:, None]], dim=1)[None]  # [1, Hkv, k + 1, S, d]
            values = torch.cat([blocks_v, cache.open_values[:, None]], dim=1)[None]
            out, probs = grouped_attention_inference(q, keys, values, self.q_block, self.p, slot_probs=True)
            self.slot_probs[li].copy_(probs[0])  # [Hkv, G, k+1, S]
            out = out.transpose(1, 2).reshape(1, 1, H * d).to(h.dtype)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = e.model.lm_head(e.llama.norm(h[:, 0]))[0].float()
        self.logits.copy_(forbid_landmark(logits, cfg.landmark_id))
