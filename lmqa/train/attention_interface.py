"""Training form of landmark attention as a transformers attention function.

Registering it lets the stock LlamaForCausalLM forward (gradient checkpointing,
peft, bf16 and all) run the grouped softmax over the whole sequence: select it
with ``model.config._attn_implementation = "landmark"`` after setting
``model.config.landmark_block_size``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from lmqa.engine.grouped_attention import sequence_grouped_attention

NAME = "landmark"


def landmark_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    out = sequence_grouped_attention(query, key, value, module.config.landmark_block_size,
                                     tile=getattr(module.config, "landmark_attention_tile", None))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, landmark_attention_forward)


def use_landmark_attention(model, block_size: int, tile: int | None = None) -> None:
    """Switch a loaded LlamaForCausalLM (or a peft wrapper of one) to the grouped softmax;
    tile selects the memory-efficient blockwise form (query blocks per tile)."""
    model.config.landmark_block_size = block_size
    model.config.landmark_attention_tile = tile
    model.config._attn_implementation = NAME
