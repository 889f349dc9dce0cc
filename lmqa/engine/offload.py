"""`--kv-offload auto`: block keys/values on the compute device while they fit
a budget there, else in host memory.

Device-resident blocks make retrieval a plain on-device gather (no host
round trip per layer), which is what a fast GPU prefill and decode need; host
memory is what lets a context outgrow the GPU. The choice is made before each
feed from its length, so a context moves to the host at most once, between
feeds, and never half-way through a prefill. On a CPU both places are the
same memory, and auto keeps today's host store.
"""

from __future__ import annotations

import torch

DEVICE_SHARE = 0.5  # of the GPU memory free at start: the rest is for weights' activations and prefill


class AutoOffload:
    """Decides where one engine's block stores live.

    limit: bytes of block keys/values (and landmark keys) allowed on the
    device; None: DEVICE_SHARE of the memory free on it now.
    """

    def __init__(self, device: torch.device, limit: int | None = None):
        if device.type != "cuda":
            self.limit = 0
        elif limit is None:
            self.limit = int(torch.cuda.mem_get_info(device)[0] * DEVICE_SHARE)
        else:
            self.limit = limit

    @property
    def initial(self) -> str:
        return "device" if self.limit > 0 else "cpu"

    def before_feed(self, engine, n_tokens: int) -> None:
        """Move the engine's stores to the host if feeding n_tokens more would
        take its blocks past the limit; an empty context (after reset) goes
        back to the device when this feed fits."""
        if not self.limit:  # CPU: nothing to choose
            return
        new_blocks = (engine.open_len + n_tokens) // engine.config.block_size
        fits = (engine.n_blocks + new_blocks) * block_bytes(engine) <= self.limit
        if engine.offload == "device" and not fits:
            engine.move_blocks("cpu")
        elif engine.offload == "cpu" and fits and engine.n_blocks == 0:
            engine.move_blocks("device")


def block_bytes(engine) -> int:
    """Bytes one block takes in all layers' stores: its keys and values in the
    storage dtype (int8 adds a float32 scale per token and head) and its
    landmark key in the compute dtype."""
    b, d, hkv = engine.config.block_size, engine.head_dim, engine.n_kv
    per_token = d * engine.kv_dtype.itemsize + (4 if engine.kv_dtype == torch.int8 else 0)
    return len(engine.stores) * hkv * (2 * b * per_token + d * engine.dtype.itemsize)

