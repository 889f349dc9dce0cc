"""Landmark fine-tuning (method page, section 2): the stock transformers forward
with the grouped softmax in every layer, next-token loss, LoRA through peft on
all projections plus the landmark embedding row.

Runs on CPU or one GPU as is, and on several GPUs under `accelerate launch`
(each process draws other examples: batches.py). Checkpoints (adapter,
optimizer, step, number of processes) are safetensors + JSON, written by the
main process, and a rerun with the same output directory resumes from the
latest one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .attention_interface import use_landmark_attention
from .batches import Prefetcher, draw_batch, draw_numbers

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    output: Path
    steps: int = 1000
    context: int = 1024  # positions per sequence, landmarks included
    block_size: int = 63
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    warmup: int = 30
    weight_decay: float = 0.0
    synthetic_rate: float = 0.5
    qa_rate: float = 0.0  # document/codebase QA examples (qa_data.py), drawn before synthetic_rate applies
    book_qa_rate: float = 0.0  # share of the QA examples made from the books' own sentences (book_qa_data.py)
    real_qa_rate: float = 0.0  # human-written questions (real_qa_data.py), drawn before qa_rate applies
    lora_rank: int = 16
    lora_alpha: int = 32
    save_every: int = 100
    seed: int = 0
    attention_tile: int | None = None  # query blocks per tile of the torch form: bounds its attention memory
    attention_form: str = "auto"  # "fused" (Triton kernels), "tiled" (torch) or "auto" (fused where it runs)
    max_minutes: float | None = None  # stop (with a checkpoint) after this long

    @property
    def n_ordinary(self) -> int:
        return self.context * self.block_size // (self.block_size + 1)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean token loss, so a retrieval
    example with a handful of answer tokens weighs as much as a page of text."""
    per_tok = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(1).clamp(min=1)
    return (per_tok.sum(1) / counts).mean()


def add_lora(model, landmark_id: int, rank: int, alpha: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        trainable_token_indices={"embed_tokens": [landmark_id]}, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_adapter_weights(model, path: Path) -> None:
    """Start a fresh LoRA (same rank and targets) from a saved adapter, e.g.
    to continue training the shipped one on new data."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = load_file(path)
    want = get_peft_model_state_dict(model, save_embedding_layers=False)  # the tensors export_adapter writes
    odd = sorted(set(want) ^ set(saved))
    if odd:
        raise ValueError(f"{path}: {len(odd)} tensors are missing or unexpected (e.g. {odd[0]}); "
                         "is its rank, targets or base model different?")
    for name, tensor in want.items():
        if tensor.shape != saved[name].shape:
            raise ValueError(f"{path}: {name} has size {tuple(saved[name].shape)}, this LoRA needs "
                             f"{tuple(tensor.shape)}; is its rank or base model different?")
    set_peft_model_state_dict(model, saved)


class ResumeError(ValueError):
    """A checkpoint this run cannot continue."""


def process_state():
    """accelerate's view of this process (index, count, device). The first
    creation in a process fixes its settings, so the CLI (which needs to know
    the main process before training) and train() create it alike."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


# ----- checkpoints -----
def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(model, optimizer, step: int, cfg: TrainConfig, losses: list, num_processes: int = 1) -> None:
    ckpt = cfg.output / "checkpoint"
    tmp = cfg.output / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    params = _trainable(model)
    tensors = {f"param/{n}": p.detach().float().cpu().contiguous() for n, p in params.items()}
    for i, (n, p) in enumerate(params.items()):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"opt/{n}/{key}"] = value.detach().float().cpu().reshape(value.shape).contiguous()
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "num_processes": num_processes,
                                               "config": {k: str(v) for k, v in asdict(cfg).items()}}))
    (tmp / "losses.json").write_text(json.dumps(losses))
    if ckpt.exists():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    tmp.rename(ckpt)


def load_checkpoint(model, optimizer, cfg: TrainConfig, num_processes: int = 1) -> tuple[int, list]:
    """(step, losses) of the checkpoint in cfg.output, its weights and AdamW
    state loaded; (0, []) if there is none. Checkpoints from before per-step
    seeding also hold the sampler's rng state, which is no longer needed."""
    ckpt = cfg.output / "checkpoint"
    if not (ckpt / "meta.json").is_file():
        return 0, []
    meta = json.loads((ckpt / "meta.json").read_text())
    saved_by = meta.get("num_processes", 1)
    if saved_by != num_processes:  # the batches each process draws depend on the count
        raise ResumeError(f"{ckpt} was written by a run of {saved_by} process(es), this one has {num_processes}: "
                          f"resume with `accelerate launch --num_processes {saved_by}`, or train into another --output")
    tensors = load_file(ckpt / "state.safetensors")
    params = _trainable(model)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
            state = {k.split("/")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
            if state:
                state["step"] = state["step"].cpu() if "step" in state else torch.tensor(float(meta["step"]))
                optimizer.state[p] = state
    return int(meta["step"]), json.loads((ckpt / "losses.json").read_text())


def export_adapter(model, out_dir: Path, landmark_meta: dict) -> list[Path]:
    """Save the adapter as fp16 safetensors, its config, and lmqa.json (base
    manifest and landmark settings), so `--model out_dir` loads it."""
    model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    (out_dir / "lmqa.json").write_text(json.dumps(landmark_meta, indent=1))
    path = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return [path, out_dir / "adapter_config.json", out_dir / "lmqa.json"]


# ----- the loop -----
def train(model, sampler, landmark_id: int, cfg: TrainConfig, log=print, progress=None) -> list[float]:
    """Train `model` (a peft model, or a plain model for full training) in place on
    sequences of cfg.n_ordinary tokens drawn from `sampler` (an ExampleSampler or
    anything with .sample() -> Example and a random.Random at .rng). Under
    `accelerate launch` every process trains on its own examples and the
    gradients are averaged: a step's global batch is batch_size x processes x
    grad_accum sequences. Returns the losses, each the mean over all processes."""
    from accelerate import Accelerator

    cfg.output.mkdir(parents=True, exist_ok=True)
    use_cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if use_cuda else "no", gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not use_cuda)
    torch.manual_seed(cfg.seed + accelerator.process_index)
    use_landmark_attention(model, cfg.block_size, tile=cfg.attention_tile, form=cfg.attention_form)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start, losses = load_checkpoint(model, optimizer, cfg, accelerator.num_processes)
    if start:
        log(f"resuming from step {start}")
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    began = time.monotonic()
    draws = draw_numbers(start, cfg.steps, cfg.grad_accum, accelerator.process_index, accelerator.num_processes)
    make = lambda key: draw_batch(sampler, cfg.seed, *key, cfg.batch_size, cfg.block_size, landmark_id)
    with Prefetcher(make, draws) as batches:
        for step in range(start, cfg.steps):
            if use_cuda and step - start in (0, 1):
                log(gpu_memory(accelerator.device, "before the first step" if step == start else "after one step"))
            loss = _step(model, optimizer, params, accelerator, batches, lr_at(step, cfg), cfg.grad_accum)
            out_of_time = cfg.max_minutes is not None and time.monotonic() - began > cfg.max_minutes * 60
            loss, out_of_time = _agree(accelerator, loss, out_of_time)
            losses.append(loss)
            if progress is not None:
                progress(step + 1, loss)
            done = step + 1
            if done % cfg.save_every == 0 or done == cfg.steps or out_of_time:
                _checkpoint(accelerator, model, optimizer, done, cfg, losses)
            if out_of_time:
                log(f"stopping at step {done}: --max-minutes reached (rerun to resume)")
                break
    model.eval()
    return losses


def gpu_memory(device: torch.device, when: str) -> str:
    """One line on the card's memory: what PyTorch's allocator holds against
    what the card has in use. A gap is memory outside the allocator (the
    CUDA context, other libraries, other processes on the card), which an
    out-of-memory error at the first step does not explain."""
    free, total = torch.cuda.mem_get_info(device)
    gib = 2**30
    return (f"GPU memory {when}: {(total - free) / gib:.2f} GiB of {total / gib:.2f} in use, PyTorch "
            f"{torch.cuda.memory_allocated(device) / gib:.2f} allocated, {torch.cuda.memory_reserved(device) / gib:.2f} reserved")


def _step(model, optimizer, params, accelerator, batches, lr: float, grad_accum: int) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches from `batches`. Returns
    this process's mean loss as a tensor, so the step waits for the device
    only once, when the losses are averaged across processes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=accelerator.device)
    for _ in range(grad_accum):
        inputs, labels = next(batches)
        with accelerator.accumulate(model):
            logits = model(input_ids=inputs.to(accelerator.device)).logits
            loss = sequence_loss(logits, labels.to(accelerator.device))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.detach() / grad_accum
    return total


def _agree(accelerator, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """The loss averaged over processes, and whether any process wants to stop,
    in one all-reduce: every process logs the same loss, and all stop at the
    same step (one stopping alone would leave the others waiting in the next
    step's gradient all-reduce)."""
    both = accelerator.reduce(torch.stack([loss.float(), torch.tensor(float(stop), device=loss.device)]), "mean")
    return both[0].item(), both[1].item() > 0


def _checkpoint(accelerator, model, optimizer, step: int, cfg: TrainConfig, losses: list) -> None:
    """The main process writes the checkpoint (the weights are the same in all
    after the step); the others wait at a barrier meanwhile, rather than in
    the next step's all-reduce, so a slow write is a visible wait here."""
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model), optimizer, step, cfg, losses, accelerator.num_processes)
    accelerator.wait_for_everyone()


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="loss")
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per-sequence mean)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
