"""End-to-end proof that training and inference agree: a tiny LLaMA trained
from scratch with landmarks on a short key-retrieval task retrieves the key
through the engine at a context 16x longer, while the same model without
retrieval (truncated to its training length) cannot."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmqa.engine import LandmarkEngine
from lmqa.landmarks import LandmarkConfig
from lmqa.train import TrainConfig, train
from lmqa.train_data import Example

VOCAB, LANDMARK, KEY, QUERY = 64, 63, 1, 2
VALUES = list(range(3, 19))  # 16 possible values: chance is 1/16
FILLER = list(range(19, 63))
BLOCK, TRAIN_CONTEXT = 15, 256


class KeySampler:
    """Filler tokens, one KEY followed by its value somewhere, QUERY at the end."""

    def __init__(self, n_ordinary: int, seed: int = 0):
        self.n = n_ordinary
        self.rng = random.Random(seed)

    def make(self, n: int) -> tuple[list[int], int]:
        ids = [self.rng.choice(FILLER) for _ in range(n - 1)]
        value = self.rng.choice(VALUES)
        at = self.rng.randrange(0, n - 2 * BLOCK)
        ids[at : at + 2] = [KEY, value]
        return ids + [QUERY], value

    def sample(self) -> Example:
        ids, value = self.make(self.n - 1)
        return Example(ids + [value], len(ids) - 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    cfg = TrainConfig(output=tmp_path_factory.mktemp("toy"), steps=400, context=TRAIN_CONTEXT, block_size=BLOCK,
                      batch_size=16, lr=3e-3, warmup=20, save_every=10_000, attention_tile=None)
    losses = train(model, KeySampler(cfg.n_ordinary), LANDMARK, cfg, log=lambda m: None)
    return model, losses


def accuracy(model, length: int, top_k: int | None, trials: int = 30) -> float:
    sampler = KeySampler(length, seed=123)
    config = LandmarkConfig(landmark_id=LANDMARK, block_size=BLOCK, top_k=top_k or 2, train_context=TRAIN_CONTEXT)
    hits = 0
    for _ in range(trials):
        ids, value = sampler.make(length)
        engine = LandmarkEngine(model, config)
        if top_k is None:  # no retrieval: only the last training-length window
            ids = ids[-config.prefill_chunk * BLOCK // (BLOCK + 1):]
        hits += int(engine.feed(ids).argmax()) == value
    return hits / trials


def test_training_lowers_loss(trained):
    _, losses = trained
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


def test_retrieves_key_16x_beyond_training_context(trained):
    model, _ = trained
    assert accuracy(model, 16 * TRAIN_CONTEXT, top_k=2) >= 0.9


def test_without_retrieval_the_key_is_out_of_reach(trained):
    model, _ = trained
    assert accuracy(model, 16 * TRAIN_CONTEXT, top_k=None) <= 0.3
