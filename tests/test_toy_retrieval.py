"""End-to-end proof that training and inference agree: a tiny LLaMA trained
from scratch with landmarks (lmqa.train.finetune, grouped softmax) on a short
key-retrieval task retrieves the key through the engine's top-k block
retrieval at a context 16x longer, while the same model without retrieval
(truncated to its training length) cannot."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmqa.train.attention_interface import use_landmark_attention
from lmqa.engine.landmark_engine import LandmarkEngine
from lmqa.engine.landmarks import LandmarkConfig, insert_landmarks
from lmqa.train.finetune import TrainConfig, train
from lmqa.train.data import Example

VOCAB, LANDMARK, KEY, QUERY = 64, 63, 1, 2
VALUES = list(range(3, 19))  # 16 possible keys: chance is 1/16
FILLER = list(range(19, 63))
DECOY_RATE = 0.1  # filler tokens replaced by a random value, away from the record
BLOCK, TOP_K = 7, 2
TRAIN_CONTEXT = 128  # positions, landmarks included: (TOP_K + 1) * (BLOCK + 1) slots + a 13-block chunk
N_TRAIN = TRAIN_CONTEXT * BLOCK // (BLOCK + 1)  # ordinary tokens in a training sequence
EVAL_LENGTH = 16 * TRAIN_CONTEXT
TRIALS = 40


class KeySampler:
    """Random filler, a record KEY v KEY v KEY v (v drawn per example)
    somewhere, QUERY at the end; the target is v.

    Decoy values are scattered through the filler, but not within a block of
    the record. Without them the model answers from the first layer, whose
    landmark keys carry no content: there the grouped softmax over all blocks
    lets the query pick value tokens straight out of every block, which works
    at the training length but not through top-k retrieval. With decoys only
    the KEY marker tells the right block, and that is visible only to the
    second layer's landmarks, which is what retrieval uses.

    A quarter of the training records sit right before the query, in its own
    block: those teach the copy through ordinary causal attention within a
    few dozen steps, after which the others (at least a block away, so only
    reachable through a landmark) only have to teach which block to pick.
    Without them the tiny model sits on a plateau for hundreds of steps."""

    RECORD = 6  # tokens of KEY v KEY v KEY v: a repeated record marks its blocks' landmarks clearly

    def __init__(self, n_ordinary: int, local_rate: float = 0.25, seed: int = 0):
        self.n = n_ordinary
        self.local_rate = local_rate
        self.rng = random.Random(seed)

    def make(self, n: int, at: int) -> tuple[list[int], int]:
        """n tokens ending in QUERY, with the record starting at token `at`."""
        rng = self.rng
        ids = [rng.choice(VALUES if rng.random() < DECOY_RATE and abs(i - at) > BLOCK + self.RECORD else FILLER)
               for i in range(n - 1)]
        value = rng.choice(VALUES)
        ids[at : at + self.RECORD] = [KEY, value] * (self.RECORD // 2)
        return ids + [QUERY], value

    def sample(self) -> Example:
        n = self.n - 1  # the answer token follows
        if self.rng.random() < self.local_rate:
            at = self.rng.randrange(n - BLOCK // 2 - self.RECORD, n - self.RECORD)
        else:
            at = self.rng.randrange(0, n - 2 * BLOCK - self.RECORD)
        ids, value = self.make(n, at)
        return Example(ids + [value], len(ids) - 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=EVAL_LENGTH,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    # Leaving the plateau is seed-dependent: of seeds 0-3, three out of four do it
    # within 300 steps (at lr 6e-3 and at 8e-3, not the same three); seed 0 does.
    cfg = TrainConfig(output=tmp_path_factory.mktemp("toy"), steps=300, context=TRAIN_CONTEXT, block_size=BLOCK,
                      batch_size=16, lr=6e-3, warmup=20, save_every=10_000, seed=0)
    assert cfg.n_ordinary == N_TRAIN
    losses = train(model, KeySampler(cfg.n_ordinary), LANDMARK, cfg, log=lambda m: None)
    return model, losses


def far_examples(trials: int, seed: int = 123):
    """Examples of EVAL_LENGTH tokens whose record lies entirely before the
    last training-length window, so the truncated control cannot see it."""
    sampler = KeySampler(EVAL_LENGTH, seed=seed)
    for _ in range(trials):
        yield sampler.make(EVAL_LENGTH, sampler.rng.randrange(0, EVAL_LENGTH - N_TRAIN - KeySampler.RECORD))


def test_training_lowers_loss(trained):
    _, losses = trained
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:20]) / 20


def test_retrieves_key_16x_beyond_training_context(trained):
    model, _ = trained
    config = LandmarkConfig(landmark_id=LANDMARK, block_size=BLOCK, top_k=TOP_K, train_context=TRAIN_CONTEXT)
    # the k + 1 block slots plus a chunk stay within the positions seen in training
    assert (TOP_K + 1) * (BLOCK + 1) + config.prefill_chunk <= TRAIN_CONTEXT
    hits = 0
    for ids, value in far_examples(TRIALS):
        engine = LandmarkEngine(model, config)
        logits = engine.feed(ids)
        assert engine.n_blocks >= 50 * TOP_K  # retrieval really chooses among many stored blocks
        hits += int(logits.argmax()) == value
    assert hits / TRIALS >= 0.9


@torch.no_grad()
def test_without_retrieval_the_key_is_out_of_reach(trained):
    """The same model over the last training-length window (grouped softmax
    over all of it, as in training) is at chance: the key is not in there."""
    model, _ = trained
    use_landmark_attention(model, BLOCK)
    hits = 0
    for ids, value in far_examples(TRIALS):
        stream = insert_landmarks(ids[-N_TRAIN:], BLOCK, LANDMARK)
        assert len(stream) <= TRAIN_CONTEXT
        logits = model(input_ids=torch.tensor([stream], device=model.device)).logits[0, -1]  # trained on a GPU if there is one
        hits += int(logits.argmax()) == value
    assert hits / TRIALS <= 0.3
