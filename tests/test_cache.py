"""LandmarkCache (lmqa/engine/cache.py): one layer's closed blocks and open block."""

from __future__ import annotations

import pytest
import torch

from lmqa.engine.cache import LandmarkCache

HKV, B, D = 2, 3, 4
S = B + 1


def new(offload="cpu", kv_dtype=None, state=None):
    return LandmarkCache.from_state(HKV, B, D, torch.float32, torch.device("cpu"), offload, kv_dtype, state)


def tokens(n, start=0):
    """n tokens' keys [n, Hkv, d] whose entries encode (position, head, dim); values are keys + 0.5."""
    pos = torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1) * 100
    k = pos + torch.arange(HKV).view(1, HKV, 1) * 10 + torch.arange(D).view(1, 1, D) * 0.1
    return k, k + 0.5


def as_blocks(k):
    """[n, Hkv, d] stream positions -> [n // S, Hkv, S, d] whole blocks."""
    return k[: len(k) // S * S].view(-1, S, HKV, D).transpose(1, 2)


def test_update_and_fetch_returns_the_window_and_stores_closed_blocks():
    cache = new()
    k, v = tokens(10)
    win_k, win_v = cache.update_and_fetch(k[:2], v[:2])  # open block only: the window is its buffers
    assert win_k.shape == (1, HKV, S, D) and cache.n_blocks == 0 and cache.open_len == 2
    assert torch.equal(win_k[0, :, :2], k[:2].transpose(0, 1)) and win_k.data_ptr() == cache.open_keys.data_ptr()
    win_k, win_v = cache.update_and_fetch(k[2:9], v[2:9])  # the open block's 2, then 7 new: 2 blocks close
    assert win_k.shape == (3, HKV, S, D)
    assert torch.equal(win_k[:2], as_blocks(k[:9])) and torch.equal(win_v[:2], as_blocks(v[:9]))
    assert torch.equal(win_k[2, :, :1], k[8:9].transpose(0, 1)) and not win_k[2, :, 1:].any()
    assert cache.n_blocks == 2 and cache.open_len == 1
    assert torch.equal(cache.landmark_keys(), k[[3, 7]].transpose(0, 1))  # each block's last slot
    assert torch.equal(cache.store.keys.view(torch.float32), as_blocks(k[:8])[:, :, :B])
    open_k, open_v = cache.open_block()
    assert torch.equal(open_k, k[8:9].transpose(0, 1)) and torch.equal(open_v, v[8:9].transpose(0, 1))
    cache.update_and_fetch(k[9:10], v[9:10])
    assert cache.open_len == 2 and cache.n_blocks == 2


def test_exact_block_end_leaves_an_empty_open_block():
    cache = new()
    k, v = tokens(2 * S)
    cache.update_and_fetch(k, v)
    assert cache.n_blocks == 2 and cache.open_len == 0 and cache.open_block()[0].shape == (HKV, 0, D)


def test_write_then_advance_equals_update():
    """The fixed-shape form (a CUDA graph's: slot given as a device tensor, no
    host state inside) leaves what update_and_fetch leaves."""
    a, b = new(), new()
    k, v = tokens(6)
    a.update_and_fetch(k[:5], v[:5])
    b.update_and_fetch(k[:5], v[:5])
    a.update_and_fetch(k[5:6], v[5:6])
    b.write(k[5:6], v[5:6], torch.tensor([b.open_len]))
    assert b.open_len == 1  # not advanced yet
    b.advance(1)
    assert all(torch.equal(x, y) for x, y in zip(a.open_block(), b.open_block()))
    with pytest.raises(ValueError, match="close"):
        b.advance(B)


def test_mark_and_trim():
    cache = new()
    k, v = tokens(30)
    cache.update_and_fetch(k[:6], v[:6])
    mark = cache.mark()
    before = [t.clone() for t in cache.open_block()]
    cache.update_and_fetch(k[6:30], v[6:30])
    assert cache.n_blocks == 7
    cache.trim(mark)
    assert cache.n_blocks == 1 and cache.open_len == 2
    assert all(torch.equal(x, y) for x, y in zip(cache.open_block(), before))
    again = new()
    again.update_and_fetch(k[:6], v[:6])
    assert torch.equal(cache.update_and_fetch(k[6:13], v[6:13])[0], again.update_and_fetch(k[6:13], v[6:13])[0])


@pytest.mark.parametrize("kv", [None, torch.int8])
def test_state_round_trip(kv):
    cache = new(kv_dtype=kv)
    k, v = tokens(23)
    cache.update_and_fetch(k, v)
    state = cache.state()
    assert set(state) == {"landmark_keys", "keys", "values", "open_keys", "open_values"} | (
        {"key_scales", "value_scales"} if kv else set())
    back = new(kv_dtype=kv, state={name: torch.cat(parts) for name, parts in state.items()})
    assert (back.n_blocks, back.open_len) == (cache.n_blocks, cache.open_len) == (5, 3)
    ids = torch.tensor([[0, 4], [2, 3]])
    assert all(torch.equal(x, y) for x, y in zip(back.gather(ids), cache.gather(ids)))
    assert all(torch.equal(x, y) for x, y in zip(back.open_block(), cache.open_block()))
    # a piece of blocks, and the state at a mark
    piece = cache.state(1, 3)
    assert torch.equal(torch.cat(piece["landmark_keys"]), cache.landmark_keys().transpose(0, 1)[1:3])
    mark = cache.mark()
    cache.update_and_fetch(*tokens(9, 23))
    at = cache.state(at=mark)
    assert at["landmark_keys"][0].shape[0] == 5 and torch.equal(at["open_keys"][0], mark.open_keys)


def test_state_refuses_an_open_block_of_a_whole_slot():
    with pytest.raises(ValueError, match="open block"):
        new(state={"open_keys": torch.zeros(HKV, S, D), "open_values": torch.zeros(HKV, S, D)})


def test_nbytes_and_moved():
    cache = new()
    cache.update_and_fetch(*tokens(13))
    blocks = 3 * HKV * B * D * 4 * 2  # keys + values, float32
    landmarks = 3 * HKV * D * 4
    assert cache.bytes_on() == {"device": landmarks, "host": blocks} and cache.nbytes == landmarks + blocks
    moved = cache.moved("device")
    assert moved.offload == "device" and moved.bytes_on() == {"device": landmarks + blocks, "host": 0}
    ids = torch.tensor([[0, 2], [1, 2]])
    assert all(torch.equal(x, y) for x, y in zip(moved.gather(ids), cache.gather(ids)))
    assert all(torch.equal(x, y) for x, y in zip(moved.open_block(), cache.open_block()))
