"""The training step's speed per attention form on a randomly initialised model
of the default model's shape (SmolLM2-135M), for a GPU that lacks the real
weights: `lmqa bench --train` measures the same on the real model.

    python scripts/kernel_bench.py --batch 16 --context 2048
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmqa.evaluation.train_bench import bench_train_step
from lmqa.train.finetune import add_lora

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--context", type=int, default=2048)
parser.add_argument("--forms", default="sdpa,fused,tiled")
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()
cfg = LlamaConfig(vocab_size=49153, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                  tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).to("cuda")
peft_model = add_lora(model, 49152, 16, 32)
print(torch.cuda.get_device_name())
for form in args.forms.split(","):
    try:
        r = bench_train_step(peft_model, form, 63, args.batch, args.context, args.steps)
        print(f"{form:6s} {r.batch}x{r.context}: {r.step_ms:8.0f} ms/step {r.positions_s:10,.0f} positions/s "
              f"peak {r.gpu_peak_mib:,.0f} MiB", flush=True)
    except torch.OutOfMemoryError as e:
        print(f"{form:6s}: out of memory ({str(e)[:80]})", flush=True)
        torch.cuda.empty_cache()
