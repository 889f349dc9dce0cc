"""Per-layer store of closed blocks (method page, section 4).

Landmark keys, one per block and key/value head, stay on the compute device
because every step scores all of them. Block keys and values are only read k
blocks at a time, so they live on the host (pinned when CUDA, for async copies)
or, with offload="device", next to the landmark keys. Keys are stored without
rotary position: positions are given at use (section 3.2.1).
"""

from __future__ import annotations

import torch


class _Growable:
    """A tensor with a growing first dimension and amortised O(1) appends."""

    def __init__(self, tail_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool):
        self.tail_shape = tail_shape
        self.dtype = dtype
        self.device = device
        self.pin = pin
        self.data = self._alloc(16)
        self.size = 0

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.empty((capacity, *self.tail_shape), dtype=self.dtype, device=self.device, pin_memory=self.pin)

    def append(self, rows: torch.Tensor) -> None:
        need = self.size + rows.shape[0]
        if need > self.data.shape[0]:
            bigger = self._alloc(max(need, 2 * self.data.shape[0]))
            bigger[: self.size] = self.data[: self.size]
            self.data = bigger
        self.data[self.size : need] = rows.to(self.device, self.dtype)
        self.size = need

    def truncate(self, size: int) -> None:
        self.size = min(self.size, size)

    def view(self) -> torch.Tensor:
        return self.data[: self.size]

    @property
    def nbytes(self) -> int:
        return self.size * self.data[0].numel() * self.data.element_size() if self.size else 0


class LayerBlockStore:
    """Closed blocks of one layer: landmark keys [n, Hkv, d], block keys/values [n, Hkv, b, d]."""

    def __init__(self, n_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, offload: str = "cpu"):
        if offload not in ("cpu", "device"):
            raise ValueError(f"offload must be 'cpu' or 'device', not {offload!r}")
        host = torch.device("cpu") if offload == "cpu" else device
        pin = offload == "cpu" and device.type == "cuda"
        self.device = device
        self.offload = offload
        self.landmark_keys = _Growable((n_kv_heads, head_dim), dtype, device, False)
        self.keys = _Growable((n_kv_heads, block_size, head_dim), dtype, host, pin)
        self.values = _Growable((n_kv_heads, block_size, head_dim), dtype, host, pin)

    def __len__(self) -> int:
        return self.landmark_keys.size

    def append(self, block_keys: torch.Tensor, block_values: torch.Tensor) -> None:
        """block_keys/values: [m, Hkv, b+1, d], landmark in the last slot."""
        self.landmark_keys.append(block_keys[:, :, -1])
        self.keys.append(block_keys[:, :, :-1])
        self.values.append(block_values[:, :, :-1])

    def truncate(self, n_blocks: int) -> None:
        for part in (self.landmark_keys, self.keys, self.values):
            part.truncate(n_blocks)

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values [Hkv, r, b, d] and landmark keys [Hkv, r, d] of block_ids [Hkv, r]."""
        heads = torch.arange(block_ids.shape[0], device=block_ids.device)[:, None]
        lm = self.landmark_keys.view()[block_ids, heads]
        host_ids, host_heads = block_ids.to(self.keys.device), heads.to(self.keys.device)
        k = self.keys.view()[host_ids, host_heads].to(self.device, non_blocking=True)
        v = self.values.view()[host_ids, host_heads].to(self.device, non_blocking=True)
        return k, v, lm

    def bytes_on(self) -> dict[str, int]:
        """Bytes held on the compute device and on the host, by role.

        On a CPU-only run both are host RAM, but the split still tells what a
        CUDA run would keep on the GPU.
        """
        blocks = self.keys.nbytes + self.values.nbytes
        on_device = self.offload == "device"
        return {"device": self.landmark_keys.nbytes + (blocks if on_device else 0),
                "host": 0 if on_device else blocks}
