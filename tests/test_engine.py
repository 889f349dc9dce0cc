"""LandmarkEngine (method page, section 3) against the training-form forward."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmqa.train.attention_interface import use_landmark_attention
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.engine.landmarks import LandmarkConfig, insert_landmarks

TOL = 1e-4
VOCAB = 128
LANDMARK = VOCAB - 1


@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_llama

    return make_tiny_llama(vocab=VOCAB, heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="module")
def mha_model():
    from conftest import make_tiny_llama

    return make_tiny_llama(vocab=VOCAB, heads=2, kv_heads=2, hidden=32, layers=3, seed=7)


def random_ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, LANDMARK, (n,), generator=g).tolist()


@torch.no_grad()
def training_form_logits(model, ids, b):
    """Logits after every ordinary token of ids, from the HF forward with the grouped softmax
    over the whole sequence with landmarks inserted: [len(ids), vocab]."""
    use_landmark_attention(model, b)
    stream = insert_landmarks(ids, b, LANDMARK)
    logits = model(torch.tensor([stream])).logits[0].float()
    rows = [i for i, t in enumerate(stream) if t != LANDMARK]
    assert len(rows) == len(ids)
    return logits[rows]


def max_diff(engine_logits, ref_logits):
    """Compare everything but the landmark entry (the engine masks it to -inf)."""
    keep = torch.arange(engine_logits.shape[-1]) != LANDMARK
    return (engine_logits[..., keep] - ref_logits[..., keep]).abs().max().item()


def make_engine(model, b, top_k, chunk=None, offload="cpu", train_context=4096, prefill="serial"):
    """The chunk-serial engine by default: these tests spy on its steps; the
    layer-major prefill is checked against it in test_layer_prefill.py."""
    cfg = LandmarkConfig(landmark_id=LANDMARK, block_size=b, top_k=top_k, train_context=train_context, chunk_size=chunk)
    return LandmarkEngine(model, cfg, offload=offload, prefill=prefill)


# ----- full retrieval equals the training form -----
@pytest.mark.parametrize("b,n", [(4, 30), (3, 24), (7, 19), (5, 5)])
def test_one_chunk_matches_training_form(model, b, n):
    ids = random_ids(n, seed=b)
    ref = training_form_logits(model, ids, b)
    engine = make_engine(model, b, top_k=64)
    assert engine.config.prefill_chunk >= len(insert_landmarks(ids, b, LANDMARK))  # really one chunk
    out = engine.feed(ids)
    assert out.shape == (VOCAB,)
    assert out[LANDMARK] == float("-inf")
    assert max_diff(out, ref[-1]) <= TOL
    assert engine.n_tokens == n
    assert engine.n_blocks == n // b
    assert engine.open_len == n % b


@pytest.mark.parametrize("b,chunk_blocks,n", [(4, 2, 43), (3, 1, 26), (5, 3, 40), (2, 1, 17)])
def test_several_chunks_match_training_form(model, b, chunk_blocks, n):
    ids = random_ids(n, seed=n)
    ref = training_form_logits(model, ids, b)
    engine = make_engine(model, b, top_k=64, chunk=chunk_blocks * (b + 1))
    steps = []
    engine._step = _recording(engine._step, steps)
    out = engine.feed(ids)
    assert len(steps) >= math.ceil(len(insert_landmarks(ids, b, LANDMARK)) / (chunk_blocks * (b + 1)))
    assert max(len(piece) for piece in steps) <= chunk_blocks * (b + 1)
    assert max_diff(out, ref[-1]) <= TOL
    assert engine.n_blocks == n // b


@pytest.mark.parametrize("cuts", [[7, 8, 20, 21, 33], [1, 2, 3, 16, 17], [12, 24, 36]])
def test_feeding_in_pieces_matches_training_form(model, cuts):
    """Pieces that end mid-block, on a block end, or one token long."""
    b, n = 4, 40
    ids = random_ids(n, seed=11)
    ref = training_form_logits(model, ids, b)
    engine = make_engine(model, b, top_k=64, chunk=2 * (b + 1))
    bounds = [0, *cuts, n]
    for lo, hi in zip(bounds, bounds[1:]):
        out = engine.feed(ids[lo:hi])
        assert max_diff(out, ref[hi - 1]) <= TOL, (lo, hi)
    assert engine.n_tokens == n


@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_token_by_token_matches_training_form(model, mha_model, which):
    m = model if which == "gqa" else mha_model
    b, n, prompt = 3, 30, 5
    ids = random_ids(n, seed=3)
    ref = training_form_logits(m, ids, b)
    engine = make_engine(m, b, top_k=64, chunk=2 * (b + 1))
    worst = max_diff(engine.feed(ids[:prompt]), ref[prompt - 1])
    for i in range(prompt, n):
        worst = max(worst, max_diff(engine.feed([ids[i]]), ref[i]))
    assert worst <= TOL
    assert engine.n_blocks == n // b
    # retrieval ran for every step after the first block was stored, i.e. every single-token feed
    assert len(engine.trace.steps) == n - prompt
    assert [s.position for s in engine.trace.steps] == list(range(prompt, n))


def test_chunk_size_not_multiple_of_slot_still_matches(model):
    """chunk_size is documented as positions per step; a non-multiple of b+1 must stay exact too."""
    b, n = 4, 37
    ids = random_ids(n, seed=2)
    ref = training_form_logits(model, ids, b)
    engine = make_engine(model, b, top_k=64, chunk=7)
    assert max_diff(engine.feed(ids), ref[-1]) <= TOL


def test_feed_nothing_is_an_error(model):
    with pytest.raises(ValueError):
        make_engine(model, 4, 2).feed([])


# ----- retrieval restricts -----
def test_small_top_k_differs_from_full(model):
    b, n = 3, 45  # 15 blocks
    ids = random_ids(n, seed=5)
    ref = training_form_logits(model, ids, b)
    engine = make_engine(model, b, top_k=2, chunk=b + 1)
    out = engine.feed(ids)
    assert max_diff(out, ref[-1]) > 1e-2
    assert engine.trace.steps[-1].block_ids.shape[-1] == 2
    # the same engine settings with k >= blocks are exact, so the difference is retrieval's
    assert max_diff(make_engine(model, b, top_k=n // b, chunk=b + 1).feed(ids), ref[-1]) <= TOL


def _recording(fn, log):
    def wrapper(*args, **kwargs):
        log.append(args[0])
        return fn(*args, **kwargs)

    return wrapper


def test_retrieved_block_ids_valid(model, monkeypatch):
    """Per step, layer and kv head: r = min(k, stored) ids, in range, sorted,
    unique, after k - r missing ones (-1, score 0)."""
    import lmqa.engine.step as eng

    b, k = 3, 3
    engine = make_engine(model, b, top_k=k, chunk=2 * (b + 1))
    seen = []
    real = eng.select_blocks

    def spy(queries, landmarks, n_before, *args, **kw):
        ids, scores = real(queries, landmarks, n_before, *args, **kw)
        seen.append((n_before[0], ids[0].clone(), scores[0].clone()))
        return ids, scores

    monkeypatch.setattr(eng, "select_blocks", spy)
    ids = random_ids(40, seed=9)
    engine.feed(ids[:30])
    for t in ids[30:]:
        engine.feed([t])
    assert len(seen) > 10
    layers = len(model.model.layers)
    assert len([s for s in seen if s[0]]) == layers * len(engine.trace.steps)  # the steps after a block is stored
    for n_stored, ids_k, scores_k in seen:
        r = min(k, n_stored)
        assert ids_k.shape == scores_k.shape == (engine.n_kv, k)
        assert (ids_k[:, : k - r] == -1).all() and (scores_k[:, : k - r] == 0).all()
        ids_r, scores_r = ids_k[:, k - r :], scores_k[:, k - r :]
        if not r:
            continue
        assert ids_r.min() >= 0 and ids_r.max() < n_stored
        assert (ids_r[:, 1:] > ids_r[:, :-1]).all()  # strictly increasing: sorted and unique
        assert ((scores_r >= 0) & (scores_r <= 1)).all()
    for step in engine.trace.steps:
        assert step.block_ids.shape[:2] == (layers, engine.n_kv)
        assert step.block_ids.max() < engine.n_blocks
    # several distinct blocks are chosen over the run (retrieval is not stuck on one choice)
    assert len({tuple(s[1].flatten().tolist()) for s in seen}) > 1


def test_selection_matches_independent_scoring(model, monkeypatch):
    """Per kv head, the kept blocks are the top-r by: softmax over stored blocks of
    q . landmark_key / sqrt(d), then max over the step's queries and the query heads
    of the head's group. Recomputed here from the rotated queries and landmark keys
    the engine used (ties allowed: compared by score, not by id)."""
    b, k = 3, 2
    engine = make_engine(model, b, top_k=k, chunk=2 * (b + 1))
    rec = RotaryRecorder(engine, monkeypatch)
    ids = random_ids(40, seed=4)
    engine.feed(ids[:30])
    for t in ids[30:]:
        engine.feed([t])
    steps = rec.steps()
    layers = len(model.model.layers)
    with_retrieval = [s for s in steps if "landmarks_rot" in s]
    assert len(with_retrieval) == layers * len(engine.trace.steps)
    group = engine.n_heads // engine.n_kv
    checked = 0
    for i, s in enumerate(with_retrieval):
        step, layer = engine.trace.steps[i // layers], i % layers
        q = s["queries_rot"][0]  # [H, T, d]
        lm = s["landmarks_rot"]  # [Hkv, n, d]
        for h in range(engine.n_kv):
            qs = q[h * group : (h + 1) * group].reshape(-1, q.shape[-1])
            best = torch.softmax(qs @ lm[h].T / math.sqrt(q.shape[-1]), dim=-1).amax(0)  # [n]
            r = min(k, lm.shape[1])
            chosen = step.block_ids[layer, h]
            assert chosen.shape == (r,)
            assert torch.allclose(best[chosen].sort().values, best.topk(r).values.sort().values, atol=1e-6)
            assert torch.allclose(step.scores[layer, h], best[chosen], atol=1e-5)
            checked += 1
    assert checked > 20


# ----- dtypes and offload -----
def _decode_run(engine, ids, prompt):
    """Logits after the prompt, then after each later token fed one by one: [n - prompt + 1, vocab]."""
    return torch.stack([engine.feed(ids[:prompt])] + [engine.feed([t]) for t in ids[prompt:]]).cpu()


def test_bfloat16_engine_matches_float64_reference(model):
    """The default on CPUs with native bf16 (and on CUDA): the engine in
    bfloat16 (weights, attention, block store) against the training form in
    float64 with the same bf16-rounded weights. bf16 keeps 8 bits of mantissa,
    so a few percent of the logits' scale; a retrieval mistake (top_k 2 here)
    is off by the whole scale."""
    import copy

    b, n, prompt = 4, 42, 30
    ids = random_ids(n, seed=21)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ref = training_form_logits(copy.deepcopy(bf16).double(), ids, b)[prompt - 1 :]
    engine = make_engine(bf16, b, top_k=64, chunk=2 * (b + 1))
    got = _decode_run(engine, ids, prompt)
    assert engine.dtype == engine.kv_dtype == engine.stores[0].keys.codes.dtype == torch.bfloat16
    assert got.dtype == torch.float32
    scale = ref.abs().max().item()
    assert max_diff(got, ref) <= 0.03 * scale
    assert max_diff(_decode_run(make_engine(bf16, b, top_k=2, chunk=2 * (b + 1)), ids, prompt), ref) > 0.2 * scale


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.03)])
def test_cuda_offloaded_and_device_stores_match_cpu_reference(model, dtype, tol):
    """The tiny model on the GPU: block keys/values in pinned host memory
    (offload cpu) or on the GPU (offload device), landmark keys on the GPU in
    both; the two give the same retrieval and logits, within tol (relative to
    the logits' scale) of a float64 CPU reference with the same weights."""
    import copy

    b, n, prompt = 4, 42, 30
    ids = random_ids(n, seed=21)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    ref = training_form_logits(copy.deepcopy(gpu).cpu().double(), ids, b)[prompt - 1 :]
    runs = {}
    for where in ("cpu", "device"):
        engine = make_engine(gpu, b, top_k=64, chunk=2 * (b + 1), offload=where)
        runs[where] = (_decode_run(engine, ids, prompt), engine)
        store = engine.stores[0]
        assert store.landmark_keys.data.device.type == "cuda"
        data = store.keys.codes.data
        if where == "cpu":
            assert data.device.type == "cpu" and data.is_pinned() and store.values.codes.data.is_pinned()
        else:
            assert data.device.type == "cuda"
        assert all(t.device.type == "cuda" for t in store.gather(torch.zeros(engine.n_kv, 1, dtype=torch.long, device="cuda")))
    (cpu_logits, cpu_engine), (dev_logits, dev_engine) = runs["cpu"], runs["device"]
    assert torch.equal(cpu_logits, dev_logits)
    for a, c in zip(cpu_engine.trace.steps, dev_engine.trace.steps):
        assert torch.equal(a.block_ids, c.block_ids)
    assert max_diff(cpu_logits, ref) <= tol * ref.abs().max().item()


def test_memory_accounting(model):
    b, n = 4, 42
    ids = random_ids(n, seed=21)
    layers, hkv, d = len(model.model.layers), model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    n_blocks = n // b
    landmark_bytes = n_blocks * layers * hkv * d * 4
    block_bytes = 2 * n_blocks * layers * hkv * b * d * 4  # keys + values
    cpu = make_engine(model, b, top_k=2, chunk=2 * (b + 1), offload="cpu")
    dev = make_engine(model, b, top_k=2, chunk=2 * (b + 1), offload="device")
    assert cpu.memory() == {"device": 0, "host": 0}
    cpu.feed(ids)
    dev.feed(ids)
    assert cpu.n_blocks == dev.n_blocks == n_blocks
    assert cpu.memory() == {"device": landmark_bytes, "host": block_bytes}
    assert dev.memory() == {"device": landmark_bytes + block_bytes, "host": 0}


# ----- positions (method page, section 3.2.1) -----
# where the engine's step rotates queries, retrieved blocks and window keys (and calls select_blocks)
STEP_MODULE = "lmqa.engine.step"


class RotaryRecorder:
    """Wraps rotate where the step and block selection call it (and
    select_blocks, for each step's block count) and decodes the rotary
    position of every rotated vector."""

    def __init__(self, engine, monkeypatch):
        import importlib

        from lmqa.engine import retrieval

        step = importlib.import_module(STEP_MODULE)
        self.engine = engine
        self.calls = []
        real = retrieval.rotate

        def spy(x, cos, sin):
            out = real(x, cos, sin)
            self.calls.append((tuple(x.shape), cos.detach().clone(), sin.detach().clone(), out.detach().clone()))
            return out

        real_select = step.select_blocks

        def select(queries, landmarks, n_before, k, slots, like_first, rows, *args):
            self.calls.append(("select", n_before[0]))
            return real_select(queries, landmarks, n_before, k, slots, like_first, rows, *args)

        for module in (step, retrieval):
            monkeypatch.setattr(module, "rotate", spy)
        monkeypatch.setattr(step, "select_blocks", select)
        rot = engine.llama.rotary_emb
        self.inv_freq = rot.inv_freq.float().cpu()
        self.scale = float(getattr(rot, "attention_scaling", 1.0))

    def positions(self, cos, sin):
        """cos/sin [..., d] -> integer positions [...] (checked to decode exactly)."""
        half = self.inv_freq.shape[0]
        c = cos[..., :half].reshape(-1, half).float() / self.scale
        s = sin[..., :half].reshape(-1, half).float() / self.scale
        cand = torch.arange(-4096, 4096, dtype=torch.float32)
        ang = cand[:, None] * self.inv_freq[None]
        err = (c[:, None] - ang.cos()[None]).abs().amax(-1) + (s[:, None] - ang.sin()[None]).abs().amax(-1)
        best = err.argmin(-1)
        assert err.gather(1, best[:, None]).max() < 1e-3, "not a rotary table row"
        return cand[best].long().view(cos.shape[:-1])

    def steps(self):
        """Per (step, layer): dict with window key positions, query positions,
        landmark scoring positions [n] and retrieved block positions [r, S].
        A layer rotates its queries [H, T, d] first; then it selects blocks
        (rotating every landmark key [Hkv, n', d] to slot 0, then the r most
        recent of the n before the step [Hkv, r, d] to theirs); if it
        retrieves, it rotates its k block slots [1, Hkv, k, S, d], of which
        the last r hold retrieved blocks; last, its window
        [1, Hkv, n_win, S, d] (padded to whole blocks: cut here after the
        last query)."""
        e = self.engine
        out = []
        for call in self.calls:
            if call[0] == "select":
                out[-1]["n"] = call[1]
                continue
            shape, cos, sin, rotated = call
            pos = self.positions(cos, sin)
            n = out[-1].get("n", 0) if out else 0
            if len(shape) == 3 and shape[0] == e.n_heads:  # queries: a new layer
                out.append({"queries": pos.reshape(-1), "queries_rot": rotated[None]})
            elif len(shape) == 3 and not n:  # no landmark to score
                continue
            elif len(shape) == 3 and "landmarks" not in out[-1]:  # every landmark key at slot 0
                out[-1]["landmarks"] = pos.expand(n).clone()
                out[-1]["landmarks_rot"] = rotated[:, :n].clone()
            elif len(shape) == 3:  # the r most recent at their slots
                r = shape[1]
                out[-1]["landmarks"][-r:] = pos
                out[-1]["landmarks_rot"][:, -r:] = rotated
            elif n and "blocks" not in out[-1]:  # the k block slots [k, S]: the last r retrieved
                out[-1]["blocks"] = pos[-min(n, shape[2]) :]
            else:  # the window [n_win, S]
                window = pos.reshape(-1)
                out[-1]["window"] = window[: int((window == out[-1]["queries"][-1]).nonzero()[0]) + 1]
        return out


def spec_landmark_positions(n, k, b):
    """Section 3.2.1, relative to the window start (first open-block position):
    k + 1 block slots end right before the window; the k most recent landmarks
    sit in their own slot (the most recent in the last one), all older ones in
    the oldest slot."""
    S = b + 1
    rho = torch.arange(n - 1, -1, -1)  # recency: 0 = most recent
    slot_back = torch.where(rho < k, rho + 1, torch.full_like(rho, k + 1))
    return -slot_back * S + b


def spec_block_positions(r, b):
    """r retrieved blocks, in original order, in the last r slots before the window."""
    S = b + 1
    return (torch.arange(r)[:, None] - r) * S + torch.arange(S)[None]


def _collect_positions(model, monkeypatch, b, k, n_prompt, n_tokens, chunk_blocks=1):
    assert model.config.num_attention_heads != model.config.num_key_value_heads != 1
    engine = make_engine(model, b, top_k=k, chunk=chunk_blocks * (b + 1))
    rec = RotaryRecorder(engine, monkeypatch)
    ids = random_ids(n_prompt + n_tokens, seed=8)
    engine.feed(ids[:n_prompt])
    for t in ids[n_prompt:]:
        engine.feed([t])
    steps = rec.steps()
    assert steps and all("window" in s and "queries" in s for s in steps)
    for s in steps:
        w0 = s["window"][0]
        assert torch.equal(s["window"], w0 + torch.arange(len(s["window"])))  # window contiguous
        assert torch.equal(s["queries"], s["window"][-len(s["queries"]):])  # queries at their window slots
    return steps


def test_positions_recent_landmarks_and_blocks(model, monkeypatch):
    """While at most k blocks are stored: every landmark and block at its true relative distance."""
    b, k = 3, 5
    steps = _collect_positions(model, monkeypatch, b, k, n_prompt=6, n_tokens=12)
    checked = 0
    for s in steps:
        if "landmarks" not in s:
            continue
        w0 = s["window"][0]
        n = len(s["landmarks"])
        assert n <= k
        assert torch.equal(s["landmarks"] - w0, spec_landmark_positions(n, k, b))
        r = s["blocks"].shape[0]
        assert r == n
        assert torch.equal(s["blocks"] - w0, spec_block_positions(r, b))
        checked += 1
    assert checked >= 10


def test_positions_retrieved_blocks_fill_last_slots(model, monkeypatch):
    """More blocks than k: the k retrieved blocks, in order, take the last k slots before the window."""
    b, k = 3, 2
    steps = _collect_positions(model, monkeypatch, b, k, n_prompt=20, n_tokens=10)
    checked = 0
    for s in steps:
        if "blocks" in s:
            assert s["blocks"].shape[0] == min(k, len(s["landmarks"]))
            assert torch.equal(s["blocks"] - s["window"][0], spec_block_positions(s["blocks"].shape[0], b))
            checked += 1
    assert checked >= 10


def test_positions_older_landmarks_share_oldest_slot(model, monkeypatch):
    """More blocks than k: the k most recent landmarks keep their own slot,
    all older ones share the oldest of the k + 1 slots (method page 3.2.1;
    reference code: mem_indices 1..k for recent, 0 for older, prefix at
    full_len - (k + 1) * (b + 1))."""
    b, k = 3, 2
    steps = _collect_positions(model, monkeypatch, b, k, n_prompt=20, n_tokens=6)
    checked = 0
    for s in steps:
        if "landmarks" in s and len(s["landmarks"]) > k:
            n = len(s["landmarks"])
            got = (s["landmarks"] - s["window"][0]).tolist()
            want = spec_landmark_positions(n, k, b).tolist()
            # the k most recent are all distinct from each other and from the older ones
            assert len(set(got[n - k:])) == k and not set(got[: n - k]) & set(got[n - k:]), (n, got, want)
            assert got == want, (n, got, want)
            checked += 1
    assert checked >= 5


# ----- snapshot / rollback -----
def test_snapshot_rollback_restores_state(model):
    b = 4
    doc = random_ids(37, seed=30)
    question = random_ids(14, seed=31)
    engine = make_engine(model, b, top_k=2, chunk=2 * (b + 1))
    engine.feed(doc)
    mark = engine.snapshot()
    state = (engine.n_blocks, engine.n_tokens, engine.open_len, len(engine.trace.steps), dict(engine.memory()))

    first = [engine.feed(question)]
    tok = int(first[-1].argmax())
    for _ in range(9):  # generate: crosses block boundaries, so stores grow
        first.append(engine.feed([tok]))
        tok = int(first[-1].argmax())
    assert engine.n_blocks > state[0]

    engine.rollback(mark)
    assert (engine.n_blocks, engine.n_tokens, engine.open_len, len(engine.trace.steps), engine.memory()) == state

    second = [engine.feed(question)]
    tok = int(second[-1].argmax())
    for _ in range(9):
        second.append(engine.feed([tok]))
        tok = int(second[-1].argmax())
    assert all(torch.equal(a, c) for a, c in zip(first, second))

    # and equal to a fresh engine fed the same tokens
    fresh = make_engine(model, b, top_k=2, chunk=2 * (b + 1))
    fresh.feed(doc)
    assert torch.equal(fresh.feed(question), first[0])


def test_rollback_then_different_question(model):
    """After rollback a different continuation sees only the document, not the discarded question."""
    b = 4
    doc, q1, q2 = random_ids(33, seed=40), random_ids(12, seed=41), random_ids(12, seed=42)
    engine = make_engine(model, b, top_k=3, chunk=2 * (b + 1))
    engine.feed(doc)
    mark = engine.snapshot()
    engine.feed(q1)
    engine.rollback(mark)
    got = engine.feed(q2)
    fresh = make_engine(model, b, top_k=3, chunk=2 * (b + 1))
    fresh.feed(doc)
    assert torch.equal(got, fresh.feed(q2))


def test_reset_forgets_everything(model):
    b = 4
    ids = random_ids(30, seed=50)
    engine = make_engine(model, b, top_k=2, chunk=2 * (b + 1))
    first = engine.feed(ids)
    engine.reset()
    assert engine.n_blocks == 0 and engine.n_tokens == 0 and engine.open_len == 0 and not engine.trace.steps
    assert torch.equal(engine.feed(ids), first)


def test_prefill_chunk_default():
    cfg = LandmarkConfig(landmark_id=1, block_size=31, top_k=5, train_context=512)
    assert cfg.prefill_chunk == 320  # the reference: 512 - 6 * 32
    assert dataclasses.replace(cfg, chunk_size=64).prefill_chunk == 64


# ----- the real default model -----
@pytest.mark.slow
def test_default_model_full_retrieval_matches_training_form():
    """The shipped default model (fetched and converted once; LMQA_CACHE picks the cache):
    with top_k >= stored blocks, chunked prefill and decoding equal the landmark HF forward."""
    from lmqa.model.loading import load_model

    loaded = load_model(device="cpu", log=lambda m: None, dtype="float32")
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.landmark
    b, L = cfg.block_size, cfg.landmark_id
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 20
    ids = tok(text, add_special_tokens=False).input_ids[:300]
    n_blocks = len(ids) // b
    cfg = dataclasses.replace(cfg, top_k=max(cfg.top_k, n_blocks + 1), chunk_size=2 * cfg.slot)

    use_landmark_attention(model, b)
    stream = insert_landmarks(ids, b, L)
    with torch.no_grad():
        ref = model(torch.tensor([stream])).logits[0].float()
    ref = ref[[i for i, t in enumerate(stream) if t != L]]
    keep = torch.arange(ref.shape[-1]) != L

    engine = LandmarkEngine(model, cfg, offload="cpu")
    prompt = len(ids) - 8
    outs = [engine.feed(ids[:prompt])] + [engine.feed([t]) for t in ids[prompt:]]
    got = torch.stack(outs)
    assert engine.n_blocks == n_blocks
    assert (got[:, keep] - ref[prompt - 1 :, keep]).abs().max().item() <= 1e-3
