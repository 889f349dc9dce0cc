"""One layer's keys and values for the landmark engine (method page, sections 3-4).

A LandmarkCache holds what a layer's attention reads besides the new tokens:
  * the closed blocks, in a LayerBlockStore (block keys/values where the
    offload setting puts them, landmark keys on the compute device);
  * the open block (the tokens after the last landmark), in fixed buffers of
    one slot's size [Hkv, b+1, d] on the compute device, with its length.
    Fixed buffers keep one address for a CUDA graph (graph_decode.py) and
    make a rollback a copy, not a reallocation.

Its protocol is mlx-lm's prompt-cache protocol in our terms:
update_and_fetch (store the new tokens' keys/values, return the window the
step attends over), mark/trim (roll back), state/from_state (named tensors
in and out: context files save and load caches through them) and nbytes.

Keys are kept without rotary position (section 3.2.1): positions are given
where they are read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .block_store import LayerBlockStore

OPEN_TENSORS = ("open_keys", "open_values")


class CacheMark(NamedTuple):
    """A cache's state to trim back to: its block count and a copy of its open block [Hkv, p, d]."""

    n_blocks: int
    open_keys: torch.Tensor
    open_values: torch.Tensor


class LandmarkCache:
    """Closed blocks (a LayerBlockStore) and the open block of one layer.

    dtype: the compute dtype (landmark keys, the open block, gathered
    blocks); kv_dtype: how block keys/values are stored; offload: "cpu"
    (block keys/values in host memory) or "device"."""

    def __init__(self, store: LayerBlockStore, open_keys: torch.Tensor | None = None,
                 open_values: torch.Tensor | None = None):
        """A cache around store (its closed blocks), with an open block [Hkv, p, d] copied in (default: empty)."""
        self.store = store
        n_kv, b, d = store.block_shape
        self.slot = b + 1
        self.open_keys = torch.zeros(n_kv, self.slot, d, dtype=store.dtype, device=store.device)  # [Hkv, S, d]
        self.open_values = torch.zeros_like(self.open_keys)
        self.open_len = 0
        if open_keys is not None:
            self._set_open(open_keys, open_values)

    @classmethod
    def from_state(cls, n_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                   offload: str = "cpu", kv_dtype: torch.dtype | None = None,
                   state: dict[str, torch.Tensor] | None = None) -> LandmarkCache:
        """A cache with these settings holding state (named as by state(), one
        tensor a name; default: empty). Block tensors are read in place where
        they already sit where the store keeps them (a context file's memory
        map); the open block is copied in."""
        state = state or {}
        blocks = {name: t for name, t in state.items() if name not in OPEN_TENSORS}
        store = LayerBlockStore(n_kv_heads, block_size, head_dim, dtype, device, offload, kv_dtype, blocks)
        return cls(store, state.get("open_keys"), state.get("open_values"))

    # ----- reading -----
    @property
    def n_blocks(self) -> int:
        return len(self.store)

    @property
    def offload(self) -> str:
        return self.store.offload

    def open_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The open block's keys and values [Hkv, p, d] (views of the buffers)."""
        return self.open_keys[:, : self.open_len], self.open_values[:, : self.open_len]

    def landmark_keys(self) -> torch.Tensor:
        """Every stored block's landmark key [Hkv, n, d] (unrotated)."""
        return self.store.landmark_keys.view().transpose(0, 1)

    def like_first(self) -> torch.Tensor:
        """Per head and stored block [Hkv, n]: is its landmark key block 0's (bitwise)?"""
        return self.store.like_first.view().transpose(0, 1)

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values [Hkv, r, b, d] and landmark keys [Hkv, r, d] of block_ids [Hkv, r]."""
        return self.store.gather(block_ids)

    # ----- writing -----
    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new tokens' keys/values [T, Hkv, d] (landmarks included, in
        stream order) after the open block; return the window: the open block
        and the new tokens cut into whole blocks [n, Hkv, S, d], the last one
        padded. The blocks the new tokens close go to the store; what follows
        the last of them becomes the open block. Padding slots are zeros, or,
        when the tokens close no block (the window is then the open block's
        buffers themselves), whatever an earlier block left there: a step's
        causal mask hides every slot after its last query from all of them."""
        S = self.slot
        p, T = self.open_len, keys.shape[0]
        if p + T < S:
            self.open_keys[:, p : p + T] = keys.transpose(0, 1)
            self.open_values[:, p : p + T] = values.transpose(0, 1)
            self.open_len = p + T
            return self.open_keys[None], self.open_values[None]
        n = -(-(p + T) // S)
        closed, tail = divmod(p + T, S)
        window = []
        for buf, new in ((self.open_keys, keys), (self.open_values, values)):
            flat = new.new_zeros(n * S, *new.shape[1:])  # [n * S, Hkv, d]
            flat[:p] = buf[:, :p].transpose(0, 1)
            flat[p : p + T] = new
            window.append(flat.view(n, S, *new.shape[1:]).transpose(1, 2))  # [n, Hkv, S, d]
        win_k, win_v = window
        self.store.append(win_k[:closed], win_v[:closed])
        if tail:
            self.open_keys[:, :tail] = win_k[closed, :, :tail]
            self.open_values[:, :tail] = win_v[closed, :, :tail]
        self.open_len = tail
        return win_k, win_v

    def write(self, keys: torch.Tensor, values: torch.Tensor, at: torch.Tensor) -> None:
        """Fixed-shape form for a CUDA graph: new tokens' keys/values [T, Hkv, d]
        into the open block's slots `at` (a device tensor [T]) that close no
        block; the length is not advanced (no host state changes inside a
        graph): advance(T) follows."""
        self.open_keys.index_copy_(1, at, keys.transpose(0, 1))
        self.open_values.index_copy_(1, at, values.transpose(0, 1))

    def advance(self, n: int) -> None:
        """Count n tokens written by write() into the open block."""
        if self.open_len + n >= self.slot:
            raise ValueError(f"{n} tokens after {self.open_len} would close the open block")
        self.open_len += n

    def _set_open(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        p = keys.shape[1]
        if p >= self.slot or values.shape != keys.shape:
            raise ValueError(f"an open block of {p} tokens in blocks of {self.slot - 1}")
        self.open_keys[:, :p] = keys
        self.open_values[:, :p] = values
        self.open_len = p

    # ----- rolling back -----
    def mark(self) -> CacheMark:
        """A mark to trim back to (the open block copied: later tokens overwrite its buffers)."""
        k, v = self.open_block()
        return CacheMark(self.n_blocks, k.clone(), v.clone())

    def trim(self, mark: CacheMark) -> None:
        """Back to mark: blocks stored since are dropped, the open block is the mark's."""
        self.store.truncate(mark.n_blocks)
        self._set_open(mark.open_keys, mark.open_values)

    # ----- saving and loading -----
    def state(self, start: int = 0, stop: int | None = None, at: CacheMark | None = None) -> dict[str, list[torch.Tensor]]:
        """Named tensors, as parts to write one after another (no copy): blocks
        start..stop (default: all, or the mark's) of every block tensor in
        its storage dtype (landmark_keys, keys, values; int8 adds
        key_scales, value_scales) and the open block [Hkv, p, d] (open_keys,
        open_values: now, or at a mark)."""
        if stop is None and at is not None:
            stop = at.n_blocks
        out = self.store.export(stop, start)
        k, v = (at.open_keys, at.open_values) if at is not None else self.open_block()
        out["open_keys"], out["open_values"] = [k], [v]
        return out

    def freeze(self, saved: dict[str, torch.Tensor]) -> None:
        """Read every block so far from saved (a context file being written) from now on (LayerBlockStore.freeze)."""
        self.store.freeze(saved)

    def moved(self, offload: str) -> LandmarkCache:
        """The same contents with block keys/values kept per offload."""
        s = self.store
        state = {name: torch.cat(parts) for name, parts in self.state().items()}
        n_kv, b, d = s.block_shape
        return LandmarkCache.from_state(n_kv, b, d, s.dtype, s.device, offload, s.kv_dtype, state)

    # ----- memory -----
    def bytes_on(self) -> dict[str, int]:
        """Block bytes on the compute device and on the host (LayerBlockStore.bytes_on)."""
        return self.store.bytes_on()

    @property
    def nbytes(self) -> int:
        return sum(self.bytes_on().values())
