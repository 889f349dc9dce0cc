"""`lmqa bench --train`: positions/s of `lmqa train`'s step with each form of the
grouped softmax, beside the same model with SDPA causal attention.

All forms train the same LoRA model on the same random ids in one process, so
their ratios hold whatever else the machine is doing. SDPA is the ceiling: the
landmark forms do the same work plus landmark bookkeeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lmqa.train.attention_interface import use_landmark_attention
from lmqa.train.finetune import sequence_loss


@dataclass
class TrainBenchRow:
    attention: str  # "sdpa" (causal, no landmarks), "fused" or "tiled" (the grouped softmax)
    batch: int
    context: int
    step_ms: float
    positions_s: float
    gpu_peak_mib: float | None  # torch.cuda.max_memory_allocated over the timed steps (CUDA only)


def _set_attention(model, form: str, block_size: int, tile: int) -> None:
    if form == "sdpa":
        model.config._attn_implementation = "sdpa"
    else:
        use_landmark_attention(model, block_size, tile=tile, form=form)


def bench_train_step(model, form: str, block_size: int, batch: int, context: int, steps: int, warmup: int = 2,
                     tile: int = 4, seed: int = 0) -> TrainBenchRow:
    """Time `steps` optimizer steps (forward, sequence loss, backward, clipping,
    AdamW) of a peft model in bf16 autocast on random ids, as `lmqa train`'s
    step runs under accelerate's bf16 mixed precision."""
    device = next(model.parameters()).device
    _set_attention(model, form, block_size, tile)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)  # [batch, context]
    cuda = device.type == "cuda"
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=ids).logits
        loss = sequence_loss(logits[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):  # kernels compile and autotune
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - began) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    model.eval()
    return TrainBenchRow(form, batch, context, seconds * 1000, batch * context / seconds, peak)
