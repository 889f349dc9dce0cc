"""Per-layer store of closed blocks (method page, section 4).

Landmark keys, one per block and key/value head, stay on the compute device
because every step scores all of them. Block keys and values are only read k
blocks at a time, so they live on the host (pinned when CUDA, for async copies)
or, with offload="device", next to the landmark keys. Keys are stored without
rotary position: positions are given at use (section 3.2.1).

Block keys/values may be kept in a narrower storage dtype than the compute
dtype (`kv_dtype`): fp16/bf16 are plain casts; int8 keeps one absmax scale per
(block, head, token), so one outlier token cannot flatten a whole block, and
costs 4 bytes of scale per head_dim bytes of codes. Gathers dequantize only the
k retrieved blocks, after the copy to the device, so the copy stays narrow.

A store can start from a frozen prefix of tensors it does not own (a context
file mapped from disk, see context_file.py): gathers index the prefix in place
and new blocks go to a separate in-memory tail, so a context larger than RAM
is paged in block by block and rolling back to it never copies it.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def parse_kv_dtype(name: str) -> torch.dtype:
    try:
        return KV_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown kv dtype {name!r}: use {', '.join(KV_DTYPES)}") from None


def kv_dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in KV_DTYPES.items()}[dtype]


class _Growable:
    """A tensor with a growing first dimension and amortised O(1) appends.

    base: an optional frozen prefix (never written, possibly memory-mapped);
    rows past it live in `data`.
    """

    def __init__(self, tail_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool,
                 base: torch.Tensor | None = None):
        self.tail_shape = tail_shape
        self.dtype = dtype
        self.device = device
        self.pin = pin
        self.base = base if base is not None else torch.empty((0, *tail_shape), dtype=dtype, device=device)
        self.data = self._alloc(16)
        self.size = self.base.shape[0]

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.empty((capacity, *self.tail_shape), dtype=self.dtype, device=self.device, pin_memory=self.pin)

    @property
    def n_base(self) -> int:
        return self.base.shape[0]

    def append(self, rows: torch.Tensor) -> None:
        start = self.size - self.n_base
        need = start + rows.shape[0]
        if need > self.data.shape[0]:
            # a quarter's headroom past a large append (a layer-major prefill
            # appends hundreds of blocks at once), so the next block does not
            # copy the whole store again
            bigger = self._alloc(max(need + need // 4, 2 * self.data.shape[0]))
            bigger[:start] = self.data[:start]
            self.data = bigger
        self.data[start:need] = rows.to(self.device, self.dtype)
        self.size += rows.shape[0]

    def truncate(self, size: int) -> None:
        self.size = min(self.size, size)
        if self.size < self.n_base:
            self.base = self.base[: self.size]

    def parts(self, n: int | None = None, start: int = 0) -> list[torch.Tensor]:
        """Rows start..n (default: to the end) in order, as pieces of the
        frozen prefix and the tail (no copy); one empty part when there are no
        rows, so the dtype and row shape are always at hand."""
        n = self.size if n is None else min(n, self.size)
        nb = self.n_base
        parts = [p for p in (self.base[start:n], self.data[max(start - nb, 0) : max(n - nb, 0)]) if p.shape[0]]
        return parts or [self.data[:0]]

    def freeze(self, base: torch.Tensor) -> None:
        """base holds a copy of every row (e.g. just written to a mapped
        file): read them there from now on; the tail's buffer is kept for
        the next rows, so memory stays at one buffer however many rows."""
        if base.shape[0] != self.size:
            raise ValueError(f"freezing {self.size} rows onto a prefix of {base.shape[0]}")
        self.base = base

    def view(self) -> torch.Tensor:
        """All rows as one tensor: a copy when there is both a prefix and a tail."""
        parts = self.parts()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def take(self, rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """self[rows, heads] (advanced indexing over the first two dims), reading
        the prefix in place."""
        nb = self.n_base
        tail = self.data[: self.size - nb]
        if nb == 0:
            return tail[rows, heads]
        heads = heads.expand_as(rows)
        in_base = rows < nb
        if bool(in_base.all()):
            return self.base[rows, heads]
        out = torch.empty((*rows.shape, *self.tail_shape[1:]), dtype=self.dtype, device=self.device)
        out[in_base] = self.base[rows[in_base], heads[in_base]]
        out[~in_base] = tail[rows[~in_base] - nb, heads[~in_base]]
        return out

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts())


class _BlockTensor:
    """Block keys or values [n, Hkv, b, d] in the storage dtype (int8: codes
    plus a float32 scale per (block, head, token))."""

    def __init__(self, tail_shape: tuple[int, ...], storage: torch.dtype, device: torch.device, pin: bool,
                 base: torch.Tensor | None = None, base_scales: torch.Tensor | None = None):
        self.codes = _Growable(tail_shape, storage, device, pin, base)
        self.scales = (_Growable(tail_shape[:-1], torch.float32, device, pin, base_scales)
                       if storage == torch.int8 else None)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def append(self, rows: torch.Tensor) -> None:
        if self.scales is None:
            self.codes.append(rows)
            return
        rows = rows.float()
        scale = rows.abs().amax(-1).clamp_min(1e-30) / 127.0
        self.codes.append(torch.round(rows / scale[..., None]).to(torch.int8))
        self.scales.append(scale)

    def truncate(self, n: int) -> None:
        self.codes.truncate(n)
        if self.scales is not None:
            self.scales.truncate(n)

    def take(self, rows: torch.Tensor, heads: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        codes = self.codes.take(rows, heads).to(device, non_blocking=True)
        if self.scales is None:
            return codes.to(dtype)
        scales = self.scales.take(rows, heads).to(device, non_blocking=True)
        return (codes.float() * scales[..., None]).to(dtype)

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        """Everything, dequantized (a copy for int8): for tests and inspection."""
        if self.scales is None:
            return self.codes.view().to(dtype)
        return (self.codes.view().float() * self.scales.view()[..., None]).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + (self.scales.nbytes if self.scales is not None else 0)


class LayerBlockStore:
    """Closed blocks of one layer: landmark keys [n, Hkv, d], block keys/values [n, Hkv, b, d].

    dtype: the compute dtype (landmark keys and gathered blocks); kv_dtype: how
    block keys/values are stored (default: dtype).
    """

    def __init__(self, n_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, offload: str = "cpu", kv_dtype: torch.dtype | None = None,
                 saved: dict[str, torch.Tensor] | None = None):
        """saved: tensors named as by export() to start from; block keys/values
        are read in place when they already sit where the store keeps them."""
        if offload not in ("cpu", "device"):
            raise ValueError(f"offload must be 'cpu' or 'device', not {offload!r}")
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in KV_DTYPES.values():
            raise ValueError(f"unsupported kv dtype {kv_dtype}")
        host = torch.device("cpu") if offload == "cpu" else device
        pin = offload == "cpu" and device.type == "cuda"
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.offload = offload
        saved = saved or {}
        shape = (n_kv_heads, block_size, head_dim)
        self.block_shape = shape  # one block's keys (or values) per head: (Hkv, b, d)

        def base(name, where, want):
            t = saved.get(name)
            return None if t is None else t.to(where, want)

        # Landmark keys are scored in full every step, so they are copied in
        # (small: 1/b of the keys) rather than read through a prefix.
        self.landmark_keys = _Growable((n_kv_heads, head_dim), dtype, device, False)
        # per block and head: is its landmark key block 0's? (at layer 0 every one is: see retrieval.select_blocks)
        self.like_first = _Growable((n_kv_heads,), torch.bool, device, False)
        if "landmark_keys" in saved:
            self._append_landmarks(saved["landmark_keys"])
        scales = kv_dtype == torch.int8
        self.keys = _BlockTensor(shape, kv_dtype, host, pin, base("keys", host, kv_dtype),
                                 base("key_scales", host, torch.float32) if scales else None)
        self.values = _BlockTensor(shape, kv_dtype, host, pin, base("values", host, kv_dtype),
                                   base("value_scales", host, torch.float32) if scales else None)
        sizes = {self.landmark_keys.size, self.keys.codes.size, self.values.codes.size}
        if len(sizes) != 1:
            raise ValueError(f"saved block tensors disagree on the number of blocks: {sorted(sizes)}")

    def __len__(self) -> int:
        return self.landmark_keys.size

    def append(self, block_keys: torch.Tensor, block_values: torch.Tensor) -> None:
        """block_keys/values: [m, Hkv, b+1, d], landmark in the last slot."""
        self._append_landmarks(block_keys[:, :, -1])
        self.keys.append(block_keys[:, :, :-1])
        self.values.append(block_values[:, :, :-1])

    def _append_landmarks(self, keys: torch.Tensor) -> None:
        start = self.landmark_keys.size
        self.landmark_keys.append(keys)
        stored = self.landmark_keys.data[: self.landmark_keys.size]  # as stored: in the compute dtype
        self.like_first.append((stored[start:] == stored[:1]).all(dim=-1))

    def truncate(self, n_blocks: int) -> None:
        for part in (self.landmark_keys, self.like_first, self.keys, self.values):
            part.truncate(n_blocks)

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values [Hkv, r, b, d] and landmark keys [Hkv, r, d] of block_ids [Hkv, r]."""
        heads = torch.arange(block_ids.shape[0], device=block_ids.device)[:, None]
        lm = self.landmark_keys.take(block_ids, heads)
        host_ids, host_heads = block_ids.to(self.keys.device), heads.to(self.keys.device)
        k = self.keys.take(host_ids, host_heads, self.device, self.dtype)
        v = self.values.take(host_ids, host_heads, self.device, self.dtype)
        return k, v, lm

    def export(self, n_blocks: int | None = None, start: int = 0) -> dict[str, list[torch.Tensor]]:
        """Tensor name -> blocks start..n_blocks (default: all), as parts to
        write one after another (the storage dtype's codes: no dequantizing,
        no concatenating)."""
        return {name: part.parts(n_blocks, start) for name, part in self._parts().items()}

    def _parts(self) -> dict[str, _Growable]:
        out = {"landmark_keys": self.landmark_keys, "keys": self.keys.codes, "values": self.values.codes}
        if self.kv_dtype == torch.int8:
            out["key_scales"] = self.keys.scales
            out["value_scales"] = self.values.scales
        return out

    @property
    def n_frozen(self) -> int:
        """Blocks whose keys/values are read from a frozen prefix (see freeze)."""
        return self.keys.codes.n_base

    def freeze(self, saved: dict[str, torch.Tensor]) -> None:
        """saved: every block so far, named as by export() (a context file
        being written): block keys/values are read there from now on and the
        memory they took is reused for the next blocks. Landmark keys stay in
        memory: every step scores all of them."""
        for name, part in self._parts().items():
            if name != "landmark_keys":
                part.freeze(saved[name].to(part.device, part.dtype))

    def bytes_on(self) -> dict[str, int]:
        """Bytes held on the compute device and on the host, by role.

        On a CPU-only run both are host RAM, but the split still tells what a
        CUDA run would keep on the GPU. A mapped prefix counts as host: it is
        what the store takes once every block has been read.
        """
        blocks = self.keys.nbytes + self.values.nbytes
        on_device = self.offload == "device"
        return {"device": self.landmark_keys.nbytes + (blocks if on_device else 0),
                "host": 0 if on_device else blocks}
