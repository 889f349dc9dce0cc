"""Where keys and queries sit (method page, section 3.2.1): the one statement
of the slot and RoPE rule that every step (serial, layer-major, graph decode)
reads its rotary tables from.

Keys are stored without rotary position and rotated when used. A step's
window (the open block, then the new tokens) starts right after k + 1
block-sized slots. Retrieved blocks take the last of those slots, in their
original order, so when every stored block is retrieved relative distances
equal those of the unchunked sequence. For scoring, the landmark keys of the
k most recent blocks keep their own slot and all older ones share the oldest
(slot 0), so no relative distance ever exceeds what the model saw in training.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.models.llama.modeling_llama import rotate_half

from .landmarks import LandmarkConfig

CosSin = tuple[torch.Tensor, torch.Tensor]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x [..., P, d] with cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def landmark_slot(recency: torch.Tensor, k: int) -> torch.Tensor:
    """The slot (0..k) a stored block's landmark is scored in, by its recency
    (0: the newest stored block): k - recency for the k most recent, 0 for
    every older one. A negative recency (a block not stored yet, in a
    fixed-shape step that masks it) gets 0 too, a valid table row."""
    return torch.where((recency >= 0) & (recency < k), k - recency, torch.zeros_like(recency))


class RopeTables(NamedTuple):
    """cos/sin tables of one step, in the model's dtype."""

    window: CosSin  # [W, d]: window rows, after the k + 1 block slots
    blocks: CosSin  # [k, S, d]: block slots 1..k, where retrieved blocks go
    landmarks: CosSin  # [k + 1, d]: a landmark key scored in slot 0..k

    @classmethod
    def build(cls, rotary_emb, like: torch.Tensor, dtype: torch.dtype, config: LandmarkConfig,
              window: int) -> RopeTables:
        """rotary_emb: the model's LlamaRotaryEmbedding; like: any tensor on
        the device (rotary_emb reads its device and dtype); window: rows."""
        S, k, dev = config.slot, config.top_k, like.device

        def table(pos: torch.Tensor) -> CosSin:
            cos, sin = rotary_emb(like, pos[None])
            return cos[0].to(dtype), sin[0].to(dtype)

        start = (k + 1) * S
        cos, sin = table(torch.arange(S, start, device=dev))
        return cls(table(torch.arange(start, start + window, device=dev)), (cos.view(k, S, -1), sin.view(k, S, -1)),
                   table(torch.arange(k + 1, device=dev) * S + config.block_size))

    def retrieved(self, r: int) -> CosSin:
        """[r, S, d]: r retrieved blocks, in order, in the last r slots before the window."""
        k = self.blocks[0].shape[0]
        return self.blocks[0][k - r :], self.blocks[1][k - r :]

    @property
    def shared_landmarks(self) -> CosSin:
        """[d]: slot 0, shared by every landmark older than the k most recent."""
        return self.landmarks[0][0], self.landmarks[1][0]

    @property
    def recent_landmarks(self) -> CosSin:
        """[k, d]: slots 1..k, the k most recent landmarks, oldest first."""
        return self.landmarks[0][1:], self.landmarks[1][1:]
