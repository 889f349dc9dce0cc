"""merge_lora against peft's own merge_and_unload."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lmqa.model.lora_merge import merge_lora

from conftest import make_tiny_llama


def test_matches_peft_merge(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"],
                        trainable_token_indices={"embed_tokens": [5]}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_tiny_llama(vocab=32, seed=1), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # LoRA B starts at zero and the token row at its original: make both matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path, safe_serialization=True, save_embedding_layers=False)
    want = peft_model.merge_and_unload().state_dict()
    model = make_tiny_llama(vocab=32, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model, tmp_path)
    got = model.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    assert not torch.equal(got["model.embed_tokens.weight"][5], before["model.embed_tokens.weight"][5])
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])


def test_refuses_per_module_ranks(tmp_path):
    """A rank or alpha that differs by module would be merged with the wrong scale: refused."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, task_type="CAUSAL_LM")
    get_peft_model(make_tiny_llama(vocab=32, seed=1), config).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="plain LoRA"):
        merge_lora(make_tiny_llama(vocab=32, seed=1), tmp_path)
