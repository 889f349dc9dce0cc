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

from .fused_attention import fused_sequence_attention, supported

NAME = "landmark"
FORMS = ("auto", "fused", "tiled")


def landmark_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    cfg = module.config
    form = getattr(cfg, "landmark_attention_form", "auto")
    if form == "fused" or (form == "auto" and supported(query, cfg.landmark_block_size)):
        out = fused_sequence_attention(query, key, value, cfg.landmark_block_size)
    else:
        out = sequence_grouped_attention(query, key, value, cfg.landmark_block_size,
                                         tile=getattr(cfg, "landmark_attention_tile", None))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, landmark_attention_forward)


def use_landmark_attention(model, block_size: int, tile: int | None = None, form: str = "auto") -> None:
    """Switch a loaded LlamaForCausalLM (or a peft wrapper of one) to the grouped softmax.

    form: "fused" (the Triton kernels of fused_attention.py), "tiled" (the torch
    form; tile selects its memory-efficient blockwise variant, query blocks per
    tile) or "auto" (fused where supported() says it runs, else tiled).
    """
    if form not in FORMS:
        raise ValueError(f"attention form must be one of {', '.join(FORMS)}, not {form!r}")
    model.config.landmark_block_size = block_size
    model.config.landmark_attention_tile = tile
    model.config.landmark_attention_form = form
    model.config._attn_implementation = NAME
