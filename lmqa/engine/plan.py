"""Planning a feed: the chunk schedule (the serial loop's chunks, and
super-chunks of them for a layer-major pass) and the memory bounds its
steps are batched within (no model here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


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
    batched_scoring: score many chunks per call (a GPU wants few large
    calls) rather than one chunk's own query rows at a time (a CPU's fewest
    passes over the scores; see retrieval.select_blocks);
    compile: fuse the batched scoring with torch.compile (retrieval.block_probs).
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
