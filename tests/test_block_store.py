"""LayerBlockStore: closed blocks of one layer (method page, section 4)."""

from __future__ import annotations

import pytest
import torch

from lmqa.block_store import LayerBlockStore

HKV, B, D = 3, 4, 5


def blocks(m, start=0):
    """m blocks [m, Hkv, b+1, d] whose entries encode (block, head, slot, dim), so any
    mix-up shows; values are keys + 0.5."""
    n = torch.arange(start, start + m).view(m, 1, 1, 1) * 1000.0
    h = torch.arange(HKV).view(1, HKV, 1, 1) * 100.0
    s = torch.arange(B + 1).view(1, 1, B + 1, 1) * 10.0
    d = torch.arange(D).view(1, 1, 1, D) * 0.01
    keys = n + h + s + d
    return keys, keys + 0.5


@pytest.fixture(params=["cpu", "device"])
def store(request):
    return LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), offload=request.param)


def test_append_and_views(store):
    assert len(store) == 0
    k, v = blocks(3)
    store.append(k, v)
    assert len(store) == 3
    assert torch.equal(store.landmark_keys.view(), k[:, :, -1])
    assert torch.equal(store.keys.view(), k[:, :, :-1])
    assert torch.equal(store.values.view(), v[:, :, :-1])
    k2, v2 = blocks(2, start=3)
    store.append(k2, v2)
    assert len(store) == 5
    assert torch.equal(store.keys.view()[3:], k2[:, :, :-1])
    assert torch.equal(store.landmark_keys.view()[:3], k[:, :, -1])


def test_growth_past_initial_capacity(store):
    cap = store.keys.data.shape[0]
    total = 0
    for m in (1, cap - 1, 1, 3, 2 * cap + 5):  # exactly full, then over, then a big jump
        k, v = blocks(m, start=total)
        store.append(k, v)
        total += m
        assert len(store) == total
        assert store.keys.data.shape[0] >= total
    k_all, v_all = blocks(total)
    assert torch.equal(store.keys.view(), k_all[:, :, :-1])
    assert torch.equal(store.values.view(), v_all[:, :, :-1])
    assert torch.equal(store.landmark_keys.view(), k_all[:, :, -1])


def test_gather_per_head(store):
    k, v = blocks(20)
    store.append(k, v)
    ids = torch.tensor([[0, 5, 19], [3, 4, 7], [19, 18, 1]])  # each head its own blocks (any order)
    gk, gv, glm = store.gather(ids)
    assert gk.shape == (HKV, 3, B, D) and gv.shape == (HKV, 3, B, D) and glm.shape == (HKV, 3, D)
    for h in range(HKV):
        for j in range(3):
            blk = int(ids[h, j])
            assert torch.equal(gk[h, j], k[blk, h, :-1])
            assert torch.equal(gv[h, j], v[blk, h, :-1])
            assert torch.equal(glm[h, j], k[blk, h, -1])
    assert gk.device == store.device


def test_gather_one_block_per_head(store):
    k, v = blocks(4)
    store.append(k, v)
    gk, gv, glm = store.gather(torch.tensor([[2], [0], [3]]))
    assert torch.equal(gk[:, 0], torch.stack([k[2, 0, :-1], k[0, 1, :-1], k[3, 2, :-1]]))
    assert torch.equal(glm[:, 0], torch.stack([k[2, 0, -1], k[0, 1, -1], k[3, 2, -1]]))


def test_truncate_then_append_overwrites(store):
    k, v = blocks(6)
    store.append(k, v)
    store.truncate(4)
    assert len(store) == 4
    assert store.keys.view().shape[0] == store.values.view().shape[0] == 4
    with pytest.raises(IndexError):
        store.gather(torch.tensor([[5], [0], [0]]))
    k2, v2 = blocks(3, start=50)
    store.append(k2, v2)
    assert len(store) == 7
    assert torch.equal(store.keys.view()[4:], k2[:, :, :-1])
    assert torch.equal(store.landmark_keys.view()[4:], k2[:, :, -1])
    assert torch.equal(store.keys.view()[:4], k[:4, :, :-1])
    store.truncate(100)  # never grows
    assert len(store) == 7
    store.truncate(0)
    assert len(store) == 0


def test_bytes_on(store):
    assert store.bytes_on() == {"device": 0, "host": 0}
    k, v = blocks(5)
    store.append(k, v)
    landmarks = 5 * HKV * D * 4
    block_kv = 2 * 5 * HKV * B * D * 4
    if store.offload == "cpu":
        assert store.bytes_on() == {"device": landmarks, "host": block_kv}
    else:
        assert store.bytes_on() == {"device": landmarks + block_kv, "host": 0}
    store.truncate(2)
    assert sum(store.bytes_on().values()) == 2 * (HKV * D * 4 + 2 * HKV * B * D * 4)


def test_dtype_conversion_on_append():
    s = LayerBlockStore(HKV, B, D, torch.float16, torch.device("cpu"), offload="cpu")
    k, v = blocks(2)
    s.append(k.double(), v.double())
    assert s.keys.view().dtype == torch.float16
    assert torch.equal(s.keys.view(), k[:, :, :-1].half())
    assert s.bytes_on()["host"] == 2 * 2 * HKV * B * D * 2


def test_offload_placement():
    cpu = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), offload="cpu")
    assert cpu.keys.device.type == "cpu" and cpu.values.device.type == "cpu"
    with pytest.raises(ValueError):
        LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), offload="disk")
