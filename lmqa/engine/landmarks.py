"""Landmark settings and landmark-token insertion."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import defaults


@dataclass(frozen=True)
class LandmarkConfig:
    """How a model was trained with landmarks, and how the engine retrieves.

    chunk_size is the number of positions (landmarks included) processed per
    prefill step; with the k retrieved blocks and the open block in front of it,
    no query ever sees a relative distance beyond train_context.
    """

    landmark_id: int
    block_size: int = defaults.BLOCK_SIZE
    top_k: int = defaults.TOP_K
    train_context: int = defaults.TRAIN_CONTEXT
    chunk_size: int | None = None

    @property
    def slot(self) -> int:
        """Positions taken by one stored block: b tokens and their landmark."""
        return self.block_size + 1

    @property
    def prefill_chunk(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        whole_blocks = (self.train_context - (self.top_k + 1) * self.slot) // self.slot
        return max(1, whole_blocks) * self.slot


def insert_landmarks(ids: list[int] | torch.Tensor, block_size: int, landmark_id: int, filled: int = 0) -> list[int]:
    """Append a landmark after every block_size ordinary tokens.

    filled: ordinary tokens already in the open block before ids, so a stream
    can be fed in pieces and still get landmarks at the same places.
    """
    out: list[int] = []
    for tok in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        out.append(int(tok))
        filled += 1
        if filled == block_size:
            out.append(landmark_id)
            filled = 0
    return out


def forbid_landmark(logits: torch.Tensor, landmark_id: int) -> torch.Tensor:
    """logits [..., vocab] with the landmark token at -inf, in place: the
    engine inserts landmarks itself, so a model never generates one. A view
    filled with a constant, so it also runs inside a captured CUDA graph."""
    logits.narrow(-1, landmark_id, 1).fill_(float("-inf"))
    return logits
