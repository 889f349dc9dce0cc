"""`lmqa bench`: the landmark engine against transformers' full attention.

Both run the same loaded model on the same passkey-style prompts in one
process, so their ratios are comparable even on a busy machine. Full attention
is the stock LlamaForCausalLM forward with its KV cache (SDPA), which is what
a user would otherwise run; its cost grows with the context, the engine's
should not.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from lmqa.engine.landmark_engine import LandmarkEngine
from .passkey import make_case


@dataclass
class BenchRow:
    method: str  # "landmark" (layer-major prefill), "landmark-serial" (chunk-serial prefill) or "full"
    tokens: int
    prefill_tok_s: float
    decode_ms: float  # per generated token, averaged
    peak_mib: float  # resident memory above the run's start, sampled
    cache_mib: float  # what the key/value cache itself holds
    gpu_peak_mib: float | None = None  # torch.cuda.max_memory_allocated over the run (CUDA only)
    blocks_on: str = ""  # the engine's block keys/values: "device" or "cpu" (host memory); full attention: ""
    cache_device_mib: float = 0.0  # of cache_mib, on the compute device ...
    cache_host_mib: float = 0.0  # ... and in host memory


class PeakRSS:
    """Samples the process's resident memory in a thread: torch's CPU
    allocations are invisible to tracemalloc, and ru_maxrss never goes down,
    so a per-measurement peak needs sampling."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.proc = psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


class CudaPeak:
    """torch.cuda.max_memory_allocated over a with-block, in MiB (None off
    CUDA). Synchronizes on entry and exit, so the block's timings are whole."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read next includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(tokenizer, length: int, seed: int) -> list[int]:
    """Exactly `length` tokens of a passkey prompt (make_case only comes close)."""
    return make_case(tokenizer, length + 64, random.Random(seed)).ids[:length]


@torch.inference_mode()
def bench_engine(engine: LandmarkEngine, ids: list[int], new_tokens: int) -> BenchRow:
    """Prefill ids, then decode new_tokens greedily. On CUDA the prefill runs
    once untimed first: a new length can make torch.compile specialize the
    prefill's kernels again (seconds), which is start-up, not reading speed."""
    if engine.device.type == "cuda":
        engine.reset()
        engine.feed(ids)
    engine.reset()
    with PeakRSS() as mem, CudaPeak(engine.device) as gpu:
        start = time.perf_counter()
        logits = engine.feed(ids)
        synchronize(engine.device)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = engine.feed([int(logits.argmax())])
        decode = time.perf_counter() - start
    cache = engine.memory()
    blocks_on = engine.offload
    engine.reset()
    return BenchRow("landmark" if engine.prefill == "layer" else "landmark-serial", len(ids), len(ids) / prefill,
                    1000 * decode / new_tokens, mem.mib, sum(cache.values()) / 2**20, gpu.mib, blocks_on,
                    cache["device"] / 2**20, cache["host"] / 2**20)


@torch.inference_mode()
def bench_full(model, ids: list[int], new_tokens: int) -> BenchRow:
    device = model.get_input_embeddings().weight.device
    with PeakRSS() as mem, CudaPeak(device) as gpu:
        start = time.perf_counter()
        out = model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        synchronize(device)
        prefill = time.perf_counter() - start
        cache, logits = out.past_key_values, out.logits[0, -1]
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(logits.argmax().view(1, 1), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]
        decode = time.perf_counter() - start
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return BenchRow("full", len(ids), len(ids) / prefill, 1000 * decode / new_tokens, mem.mib, cache_bytes / 2**20,
                    gpu.mib)
