"""LayerBlockStore: closed blocks of one layer (method page, section 4)."""

from __future__ import annotations

import pytest
import torch

from lmqa.engine.block_store import LayerBlockStore, parse_kv_dtype

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


@pytest.fixture(params=[("cpu", "cpu"), pytest.param(("cpu", "cuda"), marks=pytest.mark.cuda),
                        pytest.param(("device", "cuda"), marks=pytest.mark.cuda)], ids=lambda p: "-on-".join(p))
def store(request):
    """A store per real code path. On a CPU-only machine offload="device" takes
    the same path as offload="cpu" (same device, no pinning), so it is left to
    the CUDA cases: block keys/values in pinned host memory, or on the GPU."""
    offload, device = request.param
    return LayerBlockStore(HKV, B, D, torch.float32, torch.device(device), offload=offload)


def on(store, t: torch.Tensor) -> torch.Tensor:
    """t moved to the store's compute device (gather's block ids live there)."""
    return t.to(store.device)


def test_append_and_views(store):
    assert len(store) == 0
    k, v = blocks(3)
    store.append(k, v)
    assert len(store) == 3
    assert torch.equal(store.landmark_keys.view().cpu(), k[:, :, -1])
    assert torch.equal(store.keys.view(torch.float32).cpu(), k[:, :, :-1])
    assert torch.equal(store.values.view(torch.float32).cpu(), v[:, :, :-1])
    k2, v2 = blocks(2, start=3)
    store.append(k2, v2)
    assert len(store) == 5
    assert torch.equal(store.keys.view(torch.float32).cpu()[3:], k2[:, :, :-1])
    assert torch.equal(store.landmark_keys.view().cpu()[:3], k[:, :, -1])


def test_growth_past_initial_capacity(store):
    cap = store.keys.codes.data.shape[0]
    total = 0
    for m in (1, cap - 1, 1, 3, 2 * cap + 5):  # exactly full, then over, then a big jump
        k, v = blocks(m, start=total)
        store.append(k, v)
        total += m
        assert len(store) == total
        assert store.keys.codes.data.shape[0] >= total
    k_all, v_all = blocks(total)
    assert torch.equal(store.keys.view(torch.float32).cpu(), k_all[:, :, :-1])
    assert torch.equal(store.values.view(torch.float32).cpu(), v_all[:, :, :-1])
    assert torch.equal(store.landmark_keys.view().cpu(), k_all[:, :, -1])


def test_gather_per_head(store):
    k, v = blocks(20)
    store.append(k, v)
    ids = torch.tensor([[0, 5, 19], [3, 4, 7], [19, 18, 1]])  # each head its own blocks (any order)
    gk, gv, glm = (t.cpu() for t in store.gather(on(store, ids)))
    assert gk.shape == (HKV, 3, B, D) and gv.shape == (HKV, 3, B, D) and glm.shape == (HKV, 3, D)
    for h in range(HKV):
        for j in range(3):
            blk = int(ids[h, j])
            assert torch.equal(gk[h, j], k[blk, h, :-1])
            assert torch.equal(gv[h, j], v[blk, h, :-1])
            assert torch.equal(glm[h, j], k[blk, h, -1])
    assert all(t.device.type == store.device.type for t in store.gather(on(store, ids)))


def test_gather_one_block_per_head(store):
    k, v = blocks(4)
    store.append(k, v)
    gk, gv, glm = (t.cpu() for t in store.gather(on(store, torch.tensor([[2], [0], [3]]))))
    assert torch.equal(gk[:, 0], torch.stack([k[2, 0, :-1], k[0, 1, :-1], k[3, 2, :-1]]))
    assert torch.equal(glm[:, 0], torch.stack([k[2, 0, -1], k[0, 1, -1], k[3, 2, -1]]))


def test_truncate_then_append_overwrites(store):
    k, v = blocks(6)
    store.append(k, v)
    store.truncate(4)
    assert len(store) == 4
    assert store.keys.view(torch.float32).cpu().shape[0] == store.values.view(torch.float32).cpu().shape[0] == 4
    if store.device.type == "cpu":  # a CUDA index error is an asynchronous device assert
        with pytest.raises(IndexError):
            store.gather(torch.tensor([[5], [0], [0]]))
    k2, v2 = blocks(3, start=50)
    store.append(k2, v2)
    assert len(store) == 7
    assert torch.equal(store.keys.view(torch.float32).cpu()[4:], k2[:, :, :-1])
    assert torch.equal(store.landmark_keys.view().cpu()[4:], k2[:, :, -1])
    assert torch.equal(store.keys.view(torch.float32).cpu()[:4], k[:4, :, :-1])
    store.truncate(100)  # never grows
    assert len(store) == 7
    store.truncate(0)
    assert len(store) == 0


@pytest.mark.parametrize("offload", ["cpu", "device"])
def test_bytes_on(offload):
    """The accounting differs by setting even where the memory is the same RAM."""
    store = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), offload=offload)
    assert store.bytes_on() == {"device": 0, "host": 0}
    k, v = blocks(5)
    store.append(k, v)
    landmarks = 5 * HKV * D * 4
    block_kv = 2 * 5 * HKV * B * D * 4
    if offload == "cpu":
        assert store.bytes_on() == {"device": landmarks, "host": block_kv}
    else:
        assert store.bytes_on() == {"device": landmarks + block_kv, "host": 0}
    store.truncate(2)
    assert sum(store.bytes_on().values()) == 2 * (HKV * D * 4 + 2 * HKV * B * D * 4)


def test_dtype_conversion_on_append():
    s = LayerBlockStore(HKV, B, D, torch.float16, torch.device("cpu"), offload="cpu")
    k, v = blocks(2)
    s.append(k.double(), v.double())
    assert s.keys.codes.dtype == torch.float16
    assert torch.equal(s.keys.codes.view(), k[:, :, :-1].half())
    assert s.bytes_on()["host"] == 2 * 2 * HKV * B * D * 2


def test_offload_placement():
    """Without CUDA nothing is pinned (pinning needs a CUDA host allocator)."""
    cpu = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), offload="cpu")
    assert cpu.keys.device.type == "cpu" and cpu.values.device.type == "cpu"
    assert not cpu.keys.codes.pin and not cpu.keys.codes.data.is_pinned()
    with pytest.raises(ValueError):
        LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), offload="disk")


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_cuda_placement_pinning_and_growth(kv):
    """offload cpu on a CUDA device: codes (and int8 scales) in pinned host
    memory, also after growing past the initial capacity; landmark keys and
    gathered blocks on the GPU in the compute dtype. offload device: all on the GPU."""
    dev = torch.device("cuda")
    dtype = parse_kv_dtype(kv)
    for offload in ("cpu", "device"):
        s = LayerBlockStore(HKV, B, D, torch.float32, dev, offload=offload, kv_dtype=dtype)
        k, v = random_blocks(40)  # > the initial capacity of 16: reallocated
        s.append(k.to(dev), v.to(dev))
        parts = [s.keys.codes.data, s.values.codes.data] + ([s.keys.scales.data] if kv == "int8" else [])
        for t in parts:
            if offload == "cpu":
                assert t.device.type == "cpu" and t.is_pinned()
            else:
                assert t.device.type == "cuda"
        assert s.keys.codes.dtype == dtype and s.landmark_keys.data.device.type == "cuda"
        gk, gv, glm = s.gather(torch.tensor([[0, 39], [5, 6], [17, 30]], device=dev))
        assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in (gk, gv, glm))
        cpu = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), kv_dtype=dtype)
        cpu.append(k, v)
        want = cpu.gather(torch.tensor([[0, 39], [5, 6], [17, 30]]))
        for got, ref in zip((gk, gv, glm), want):
            if kv == "int8":  # the GPU may round a code at .5 the other way: one step of its scale at most
                torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=float(ref.abs().amax()) / 127)
            else:
                assert torch.equal(got.cpu(), ref)


# ----- storage dtypes -----
def random_blocks(m, seed=0):
    """Activation-like blocks: Gaussian with a few large outlier channels."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(m, HKV, B + 1, D, generator=g)
    keys[..., 1] *= 20.0
    return keys, torch.randn(m, HKV, B + 1, D, generator=g)


@pytest.mark.parametrize("kv", ["fp32", "fp16", "bf16", "int8"])
def test_kv_dtype_gather_error(kv):
    """Stated bounds: fp32 exact; fp16/bf16 within their rounding (2^-11, 2^-8
    relative); int8 within half a step of its per-(block, head, token) scale,
    i.e. |error| <= absmax over d / 254."""
    s = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), kv_dtype=parse_kv_dtype(kv))
    k, v = random_blocks(7)
    s.append(k, v)
    ids = torch.tensor([[0, 3, 6], [1, 2, 5], [6, 5, 4]])
    gk, gv, glm = s.gather(ids)
    assert gk.dtype == gv.dtype == torch.float32
    heads = torch.arange(HKV)[:, None]
    want_k, want_v = k[:, :, :-1][ids, heads], v[:, :, :-1][ids, heads]
    assert torch.equal(glm, k[:, :, -1][ids, heads])  # landmark keys stay in the compute dtype
    for got, want in ((gk, want_k), (gv, want_v)):
        err = (got - want).abs()
        if kv == "fp32":
            assert torch.equal(got, want)
        elif kv in ("fp16", "bf16"):
            rel = 2.0**-11 if kv == "fp16" else 2.0**-8
            assert (err <= want.abs() * rel + 1e-7).all()
        else:
            bound = want.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5)
            assert (err <= bound).all()
            assert err.max() > 0  # it really is quantized


def test_int8_store_is_a_quarter_plus_scales():
    s = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), kv_dtype=torch.int8)
    k, v = random_blocks(5)
    s.append(k, v)
    assert s.bytes_on()["host"] == 2 * 5 * HKV * B * (D + 4)


def test_parse_kv_dtype():
    assert parse_kv_dtype("int8") is torch.int8
    with pytest.raises(ValueError, match="fp32, fp16, bf16, int8"):
        parse_kv_dtype("fp8")


# ----- starting from saved tensors (a mapped context file) -----
@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_saved_prefix_then_tail(kv):
    """A store rebuilt from another's export gathers the same, appends into a
    tail without touching the prefix, and rolls back to the prefix."""
    dtype = parse_kv_dtype(kv)
    first = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), kv_dtype=dtype)
    k, v = random_blocks(6)
    first.append(k, v)
    saved = {name: torch.cat(parts) for name, parts in first.export().items()}
    frozen = {name: t.clone() for name, t in saved.items()}
    s = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), kv_dtype=dtype, saved=saved)
    assert len(s) == 6
    assert s.keys.codes.base.data_ptr() == saved["keys"].data_ptr()  # read in place, not copied
    k2, v2 = random_blocks(3, seed=1)
    s.append(k2, v2)
    first.append(k2, v2)
    assert len(s) == 9
    ids = torch.tensor([[0, 5, 8], [6, 7, 8], [1, 2, 3]])  # mixed, tail only, prefix only
    for a, b in zip(s.gather(ids), first.gather(ids)):
        assert torch.equal(a, b)
    for name, t in saved.items():
        assert torch.equal(t, frozen[name]), name
    s.truncate(6)
    with pytest.raises(IndexError):
        s.gather(torch.tensor([[6], [0], [0]]))
    s.truncate(4)  # below the prefix: the prefix view shrinks
    assert len(s) == 4 and s.keys.codes.n_base == 4
    k3, v3 = random_blocks(1, seed=2)
    s.append(k3, v3)
    gk, _, _ = s.gather(torch.tensor([[4], [4], [4]]))
    fresh = LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"), kv_dtype=dtype)
    fresh.append(k3, v3)
    assert torch.equal(gk, fresh.gather(torch.tensor([[0], [0], [0]]))[0])
    assert torch.equal(saved["keys"], frozen["keys"])
    assert [p.shape[0] for p in s.export()["keys"]] == [4, 1]
    assert [p.shape[0] for p in s.export(3)["keys"]] == [3]
    assert [p.shape[0] for p in s.export(5)["values"]] == [4, 1]


def test_saved_tensors_must_agree():
    k, v = random_blocks(3)
    with pytest.raises(ValueError, match="disagree"):
        LayerBlockStore(HKV, B, D, torch.float32, torch.device("cpu"),
                        saved={"landmark_keys": k[:, :, -1], "keys": k[:2, :, :-1], "values": v[:2, :, :-1]})
