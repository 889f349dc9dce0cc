"""Merging a saved LoRA adapter into a model's weights without peft.

Why: peft builds a LoRA layer around every target module before it merges,
which costs about 2.5 s per load on a 2-core CPU (a third of a fresh `lmqa ask`);
the merge itself is one small matmul per module. Same arithmetic as peft's
merge_and_unload (W += B @ A * alpha / r, in float32; trainable token rows
replaced), tested against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."
TOKENS = ".token_adapter.trainable_tokens_delta"


def merge_lora(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Add the adapter in adapter_dir (adapter_config.json and
    adapter_model.safetensors, as peft saves them) into model in place."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if (config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out")
            or config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters (one rank and alpha for all modules) can be merged")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len(PREFIX):-len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            weight = modules[name].weight
            delta = b.float() @ a.float() * scale  # [out, in]
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        rows = config.get("trainable_token_indices") or {}
        for key, values in tensors.items():
            if key.endswith(TOKENS):
                name = key[len(PREFIX):-len(TOKENS)]
                weight = modules[name].weight  # tied to the output layer where the model ties them, as in peft
                index = torch.tensor(rows[name.rsplit(".", 1)[-1]], device=weight.device)
                weight[index] = values.to(weight.device, weight.dtype)
