"""Shared fixtures: tiny random LLaMA models and a tiny tokenizer, all offline.

Nothing here touches the user's real lmqa cache: LMQA_CACHE points at a temp
dir for the whole session (unless the caller set it, e.g. for the slow test),
and every non-slow test additionally gets its own lmqa.model.loading.CACHE_DIR.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if "LMQA_CACHE" not in os.environ:  # a throwaway cache (a converted model is ~350 MB), removed at exit
    os.environ["LMQA_CACHE"] = tempfile.mkdtemp(prefix="lmqa-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LMQA_CACHE"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared 2-core machine

# CI has the time and PyPI access the real model needs; elsewhere it is opt-in.
SLOW = os.environ.get("LMQA_SLOW") == "1" or os.environ.get("CI") == "true"

# Sentences the tiny tokenizer is trained on (the passkey and QA templates' words).
CORPUS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.",
    "I will quiz you about the important information there.",
    "The pass key is 12345. Remember it. 12345 is the pass key. What is the pass key?",
    "Read the document below, then answer the question that follows it. Answer from the document only, briefly.",
    "Question: what colour is the sky? Answer: blue. 0 1 2 3 4 5 6 7 8 9",
]


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="uses the real default model; set LMQA_SLOW=1 (or CI=true) to run")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not SLOW:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """A private, empty lmqa cache for every test that does not need the real model."""
    if request.node.get_closest_marker("slow") is not None:
        yield None
        return
    import lmqa.model.loading

    cache = tmp_path / "lmqa-cache"
    monkeypatch.setattr(lmqa.model.loading, "CACHE_DIR", cache)
    yield cache


def make_tiny_llama(vocab: int = 128, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    seed: int = 0, init: float = 0.2, rope_theta: float = 10000.0, tie: bool = False):
    """A tiny random LlamaForCausalLM in fp32, eval mode.

    init (the weights' std) is far above LLaMA's 0.02 so attention is peaked
    and a wrong block, position or mask changes the logits visibly.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      initializer_range=init, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    model = LlamaForCausalLM(cfg).float().eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory: tiny_llama(**overrides) -> a fresh tiny LlamaForCausalLM."""
    return make_tiny_llama


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (any text encodes) saved with save_pretrained."""
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tiny_tokenizer().save_pretrained(out)
    return out


def save_tiny_model_dir(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A Hugging Face directory (config, weights, tokenizer) usable as --model DIR."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_llama(vocab=len(tok), seed=seed)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), tiny_tokenizer_dir, seed=1)


# SmolLM2-Instruct's template in short: ChatML with a default system turn.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
          "You are a helpful AI assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tiny_tokenizer_dir, tmp_path_factory):
    """The tiny model with ChatML special tokens and a chat template (the
    conftest tokenizer has none, so every other test takes the plain path)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok_dir = tmp_path_factory.mktemp("chat-tokenizer")
    tok.save_pretrained(tok_dir)
    return save_tiny_model_dir(tmp_path_factory.mktemp("chat-model"), tok_dir, seed=2)


def run_in_triton_interpreter(test_file: str, min_passed: int) -> None:
    """Run test_file again in a child process with TRITON_INTERPRET=1 set from
    the start (Triton picks its interpreter when a kernel is defined, on
    import), and check that at least min_passed of its tests passed there."""
    import re
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                         cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=600)
    passed = re.search(r"(\d+) passed", res.stdout)
    assert res.returncode == 0 and passed and int(passed[1]) >= min_passed, res.stdout[-6000:] + res.stderr[-3000:]


TINY_LANDMARK = 127  # the landmark id of the engine tests' tiny models (vocabulary 128)


def random_ids(n: int, seed: int, below: int = TINY_LANDMARK) -> list[int]:
    """n ordinary token ids (never the landmark), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, below, (n,), generator=g).tolist()


def landmark_engine(model, prefill: str, b: int, k: int, chunk: int, **kw):
    """A LandmarkEngine over a tiny model: block b, top-k k, prefill chunk `chunk`."""
    from lmqa.engine.landmark_engine import LandmarkEngine
    from lmqa.engine.landmarks import LandmarkConfig

    cfg = LandmarkConfig(landmark_id=TINY_LANDMARK, block_size=b, top_k=k, train_context=4096, chunk_size=chunk)
    return LandmarkEngine(model, cfg, prefill=prefill, **kw)
