"""The engine's outputs pinned to what the code gave before its restructuring
(issue 32): serial prefill, layer-major prefill and decoding (the eager token
step, and the fixed-shape decoder's step run eagerly) on tiny random LLaMAs,
in float32, bfloat16 and with an int8 store, with the GPU's layer-major
settings on CPU too.

tests/data/engine_golden.safetensors holds the outputs of commit 6fc1250
(the last before the change); regenerate only on purpose, with
LMQA_REGENERATE_GOLDEN=1 (then say why in the commit). Logits, retrieval
scores, block ids and every stored key/value (by checksum) are compared exactly: the
engine must compute the same floats as before, in the same order, but for
the differences CHANGED names and bounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmqa.qa.evidence import EvidenceRecorder

from conftest import landmark_engine as make_engine, make_tiny_llama, random_ids

GOLDEN = Path(__file__).parent / "data" / "engine_golden.safetensors"
VOCAB = 128




def digest(t: torch.Tensor) -> torch.Tensor:
    """sha256 of a tensor's dtype, shape and bytes (stored blocks: exact, and 32 bytes in the fixture)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def state(engine, name: str) -> dict[str, torch.Tensor]:
    """Everything an engine holds and has retrieved, as named tensors."""
    out = {}
    steps = engine.trace.steps
    out[f"{name}.trace.position"] = torch.tensor([s.position for s in steps], dtype=torch.long)
    out[f"{name}.trace.kind"] = torch.tensor([s.kind == "chunk" for s in steps], dtype=torch.bool)
    for i, s in enumerate(steps):
        out[f"{name}.trace.{i}.ids"] = s.block_ids.cpu().contiguous()
        out[f"{name}.trace.{i}.scores"] = s.scores.cpu().contiguous()
    for li, store in enumerate(engine.stores):
        for part, tensors in store.export().items():
            if name.startswith("tiny_budget"):  # small, and compared within a tolerance (CHANGED)
                out[f"{name}.layer{li}.{part}"] = torch.cat(tensors).cpu().contiguous()
            else:
                out[f"{name}.layer{li}.{part}.sha256"] = digest(torch.cat(tensors))
    for li, (k, v) in enumerate(zip(engine.open.keys, engine.open.values)):
        out[f"{name}.layer{li}.open_keys"] = k.cpu().clone()
        out[f"{name}.layer{li}.open_values"] = v.cpu().clone()
    out[f"{name}.counts"] = torch.tensor([engine.n_tokens, engine.n_blocks, engine.open_len])
    return out


def run(engine, ids, name, prompt, decode=30, evidence=True) -> dict[str, torch.Tensor]:
    """Prefill ids[:prompt] in two feeds, decode `decode` tokens one by one,
    score a short answer with every=True and record a short feed's evidence;
    then the engine's whole state."""
    out = {}
    cut = prompt * 2 // 3
    engine.feed(ids[:cut])
    out[f"{name}.prefill"] = engine.feed(ids[cut:prompt]).cpu()
    mark = engine.snapshot()
    out[f"{name}.decode"] = torch.stack([engine.feed([t]).cpu() for t in ids[prompt : prompt + decode]])
    out[f"{name}.every"] = engine.feed(ids[prompt + decode : prompt + decode + 9], every=True).cpu()
    if evidence:
        engine.record_evidence(EvidenceRecorder())
        out[f"{name}.evidence_logits"] = engine.feed(ids[prompt + decode + 9 : prompt + decode + 20]).cpu()
        mass = engine.evidence.result()
        engine.record_evidence(None)
        out[f"{name}.evidence_mass"] = mass.mass
        out[f"{name}.evidence_rows"] = torch.tensor([mass.rows])
    out.update(state(engine, name))
    engine.rollback(mark)
    out[f"{name}.after_rollback"] = engine.feed([ids[prompt]]).cpu()
    return out


def fixed_shape_decoder(engine):
    """The CUDA graph decoder's step: run eagerly on a CPU (the CPU form of
    the captured graph), captured on CUDA (the engine's own decoder)."""
    from lmqa.engine.graph_decode import GraphDecoder

    if engine.device.type == "cpu":
        try:
            engine.decoder = GraphDecoder(engine.model, engine.config, capture=False)
        except TypeError:  # the commit the fixture was made with: GraphDecoder(engine, capture)
            engine.decoder = GraphDecoder(engine, capture=False)
    return engine


def outputs(device: str = "cpu") -> dict[str, torch.Tensor]:
    out = {}
    gqa = make_tiny_llama(vocab=VOCAB, hidden=48, heads=6, kv_heads=2, layers=2, seed=0).to(device)
    gqa31 = make_tiny_llama(vocab=VOCAB, hidden=36, heads=3, kv_heads=1, layers=3, seed=4).to(device)
    bf16 = make_tiny_llama(vocab=VOCAB, hidden=48, heads=6, kv_heads=2, layers=2, seed=0, init=0.05).bfloat16().to(device)
    ids = random_ids(320, seed=19)
    b, k, chunk = 4, 3, 15
    for prefill in ("serial", "layer"):
        out.update(run(make_engine(gqa, prefill, b, k, chunk), ids, f"fp32.{prefill}", 250))
        out.update(run(make_engine(gqa31, prefill, 5, 2, 12), ids, f"gqa31.{prefill}", 200, decode=12))
        out.update(run(make_engine(bf16, prefill, b, 2, 16), ids, f"bf16.{prefill}", 250, decode=12))
        out.update(run(make_engine(gqa, prefill, b, 2, 10, kv_dtype=torch.int8), ids, f"int8.{prefill}", 120,
                       decode=12))
    # the GPU's layer-major settings: batched scoring, whole-window and 2-block attention tiles, device store
    for tile in (1 << 20, 2):
        engine = make_engine(gqa, "layer", b, k, chunk, offload="device")
        engine.prefill_budget = dataclasses.replace(engine.prefill_budget, query_tile=tile, batched_scoring=True)
        out.update(run(engine, ids, f"gpu_settings.tile{tile}", 250, decode=8, evidence=False))
    # tiny budgets: super-chunks of one or two chunks, score batches of one chunk
    for batched in (False, True):
        engine = make_engine(gqa, "layer", b, k, 10)
        engine.prefill_budget = dataclasses.replace(engine.prefill_budget, positions=15, score_elements=1,
                                                    attention_elements=1, row_tile=7, batched_scoring=batched)
        out.update(run(engine, ids, f"tiny_budget.{batched}", 200, decode=4, evidence=False))
    # decoding through the fixed-shape step (blocks on the device, as it requires)
    for prefill in ("serial", "layer"):
        engine = fixed_shape_decoder(make_engine(gqa, prefill, b, k, chunk, offload="device"))
        out.update(run(engine, ids, f"graph.{prefill}", 250))
        engine = fixed_shape_decoder(make_engine(bf16, prefill, b, 2, 16, offload="device"))
        out.update(run(engine, ids, f"graph_bf16.{prefill}", 250, decode=12))
    return out


@pytest.fixture(scope="module")
def computed():
    return outputs()


def test_regenerate(computed):
    if os.environ.get("LMQA_REGENERATE_GOLDEN") != "1":
        pytest.skip("set LMQA_REGENERATE_GOLDEN=1 to write the fixture")
    GOLDEN.parent.mkdir(exist_ok=True)
    save_file(computed, GOLDEN)


# What changed on purpose since the fixture, and by how much it may differ: (name pattern, atol, why).
CHANGED = [
    (r"(gpu_settings|tiny_budget)\..*\.trace\.\d+\.scores", 1e-6,
     "block scores: one rule for every step (retrieval.block_probs): the batched form sums probabilities "
     "where it summed log-probabilities, and token steps tile query rows by the budget as prefill does"),
    (r"tiny_budget\..*\.(every|layer[1-9]\.(keys|values|landmark_keys))", 1e-5,
     "one landmark step (step.landmark_layer): serial steps tile projections by budget.row_tile as layer-major "
     "ones do; only a row tile below a chunk's length (7 here; 2,048 or more in real budgets) shows it"),
]


def allowed(name: str) -> float:
    return next((atol for pattern, atol, _ in CHANGED if re.fullmatch(pattern, name)), 0.0)


def differences(computed: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float | str]:
    """Name -> largest difference (or what differs) of every output that is
    not equal to the pinned one but for what CHANGED allows."""
    out = {}
    for name in sorted(set(want) | set(computed)):
        a, b = computed.get(name), want.get(name)
        if a is None or b is None:
            out[name] = "missing here" if a is None else "not pinned"
        elif a.dtype != b.dtype or a.shape != b.shape:
            out[name] = f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        elif not torch.equal(a, b) and not torch.allclose(a, b, rtol=0, atol=allowed(name)):
            out[name] = (a.double() - b.double()).abs().nan_to_num().max().item() if a.is_floating_point() else "bytes"
    return out


def test_outputs_equal_the_pinned_ones(computed):
    assert differences(computed, load_file(GOLDEN)) == {}


if __name__ == "__main__":
    # On a GPU (no fixture is kept for one: its rounding is the card's), compare two commits there:
    #   PYTHONPATH=OLD_TREE python tests/test_engine_golden.py cuda old.safetensors
    #   PYTHONPATH=NEW_TREE python tests/test_engine_golden.py cuda new.safetensors
    #   python tests/test_engine_golden.py --compare old.safetensors new.safetensors
    import sys

    if sys.argv[1] == "--compare":
        found = differences(load_file(sys.argv[3]), load_file(sys.argv[2]))
        print(f"{len(found)} outputs differ beyond CHANGED:" if found else "all outputs equal (within CHANGED)")
        for name, diff in found.items():
            print(f"  {name}: {diff}")
        sys.exit(1 if found else 0)
    import lmqa

    print(f"{lmqa.__file__}: outputs on {sys.argv[1]}")
    save_file({k: v.cpu().contiguous() for k, v in outputs(sys.argv[1]).items()}, sys.argv[2])
