"""bitsandbytes quantization: the LoRA adapter is merged before quantizing; CUDA loading.

The CPU test needs bitsandbytes' CPU backend (installed with lmqa); the
`cuda` tests run only on a GPU machine (conftest skips them elsewhere):
python -m pytest -m cuda tests/test_quantize.py
"""

from __future__ import annotations

import json

import pytest
import torch

import lmqa.model.loading as loading

QUANT_LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir):
    """An `lmqa train`-style adapter (LoRA + trained landmark row) over the tiny model directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    landmark = loading.add_landmark_token(model, tok, "<landmark>")
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False,
                        trainable_token_indices={"embed_tokens": [landmark]})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens" in name:
                p.add_(1.0)  # a landmark row that differs visibly from the mean row
    d = tmp_path / "adapter"
    peft_model.save_pretrained(d, save_embedding_layers=False)
    (d / loading.ADAPTER_META).write_text(json.dumps({"base": str(tiny_model_dir), "block_size": 4}))
    return d


def quantized_layers(model, kind: str) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == QUANT_LAYER[kind]]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def check_merged_then_quantized(loaded, adapter_dir, kind: str, device: str):
    reference = loading.load_model(str(adapter_dir), device=device, dtype="float32", log=lambda m: None)
    base_dir = json.loads((adapter_dir / loading.ADAPTER_META).read_text())["base"]
    plain = loading.load_model(base_dir, device=device, dtype="float32", log=lambda m: None)
    model = loaded.model
    assert not any("lora" in n or "trainable_tokens" in n for n, _ in model.named_modules()), "adapter left unmerged"
    assert quantized_layers(model, kind), "no bitsandbytes layers"
    lm = loaded.landmark.landmark_id
    assert lm == reference.landmark.landmark_id
    # the trained landmark row survived the merge (embeddings stay unquantized)
    got = model.get_input_embeddings().weight[lm].float().cpu()
    want = reference.model.get_input_embeddings().weight[lm].float().cpu()
    assert torch.allclose(got, want, atol=2e-2)
    ids = torch.tensor([[1, 5, 9, lm, 13, 2]], device=model.device)
    with torch.no_grad():
        q, merged, base = (m(ids).logits.float().cpu() for m in (model, reference.model, plain.model))
    assert torch.isfinite(q).all()
    # the quantized model carries the adapter: closer to the merged model than to the bare base
    assert corr(q, merged) > max(corr(q, base), 0.8), (corr(q, merged), corr(q, base))


def test_adapter_merged_before_quantizing_cpu(adapter_dir, isolated_cache):
    loaded = loading.load_model(str(adapter_dir), quantize="nf4", device="cpu", log=lambda m: None)
    assert loaded.trained and loaded.landmark.block_size == 4
    check_merged_then_quantized(loaded, adapter_dir, "nf4", "cpu")
    assert len(list((isolated_cache / "merged").iterdir())) == 1
    loading.load_model(str(adapter_dir), quantize="nf4", device="cpu", log=lambda m: pytest.fail(m))  # cached: no merge


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_on_cuda(kind, tiny_model_dir):
    """Weights quantized on the GPU, bf16 compute, lm_head and embeddings (landmark row) kept; the engine runs."""
    from lmqa.engine.landmark_engine import LandmarkEngine

    loaded = loading.load_model(str(tiny_model_dir), quantize=kind, device="cuda", block_size=8, log=lambda m: None)
    model = loaded.model
    assert quantized_layers(model, kind) and all(p.device.type == "cuda" for p in model.parameters())
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    if kind == "nf4":
        assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if type(m).__name__ == "Linear4bit")
    full = loading.load_model(str(tiny_model_dir), device="cuda", block_size=8, log=lambda m: None)
    ids = list(range(1, 200))
    logits = LandmarkEngine(model, loaded.landmark, offload="cpu").feed(ids).float()
    reference = LandmarkEngine(full.model, full.landmark, offload="cpu").feed(ids).float()
    ordinary = torch.arange(len(logits), device=logits.device) != loaded.landmark.landmark_id  # never generated: -inf
    assert logits[~ordinary].eq(float("-inf")).all() and torch.isfinite(logits[ordinary]).all()
    # nf4 of a 48-wide random model keeps a correlation of 0.83 with full precision on an H200
    # (int8 above 0.9); 0.7 leaves room for other cards and bitsandbytes versions
    assert corr(logits[ordinary], reference[ordinary]) > 0.7


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_merged_before_quantizing_cuda(kind, adapter_dir, isolated_cache):
    loaded = loading.load_model(str(adapter_dir), quantize=kind, device="cuda", log=lambda m: None)
    check_merged_then_quantized(loaded, adapter_dir, kind, "cuda")
