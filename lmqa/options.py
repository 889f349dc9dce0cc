"""The options a command runs with, one object per concern.

Each command builds these once from its flags (and the LMQA_* environment
variables Typer reads for them: lmqa/flags.py, whose flags are named as
these fields are) and passes them down: what is read (ReadOptions), which
model (ModelOptions), how the engine keeps and reads its blocks
(EngineOptions), and how questions are answered (AnswerOptions).
Every engine a command makes, a context file's included, is built by
EngineOptions.engine, so none of them can miss a setting. A value lmqa
cannot use fails here, as one OptionError naming its flag, before a model
loads or a document is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmqa.engine.generation import SamplingConfig
    from lmqa.engine.landmark_engine import LandmarkEngine
    from lmqa.model.loading import LoadedModel

OFFLOADS = ("cpu", "device", "auto")
PREFILLS = ("layer", "serial")


class OptionError(ValueError):
    """A flag or environment variable holds a value lmqa cannot use."""


def _size(flag: str, text: str) -> int | None:
    """Bytes from a size flag (None: auto)."""
    from lmqa.engine.memory_budget import parse_budget

    try:
        return parse_budget(text)
    except ValueError as e:
        raise OptionError(f"{flag}: {e}") from None


@dataclass(frozen=True)
class ModelOptions:
    """Which model and how it loads: --model (None: the default model),
    --quantize, --device, and --top-k and --block-size (None: the model's
    own). Frozen, so `lmqa serve` can load each distinct one once."""

    model: str | None = None
    quantize: str = "none"
    device: str = "auto"
    top_k: int | None = None
    block_size: int | None = None


@dataclass(frozen=True)
class EngineOptions:
    """How an engine keeps and reads block keys/values: --kv-offload,
    --prefill, --max-gpu-memory (auto offload's GPU budget), --kv-dtype
    (None: the model's dtype) and -v (say where the blocks live)."""

    kv_offload: str = "auto"
    prefill: str = "layer"
    max_gpu_memory: str = "auto"
    kv_dtype: str | None = None
    verbose: bool = False

    def __post_init__(self):
        if self.kv_offload not in OFFLOADS:
            raise OptionError(f"--kv-offload must be cpu, device or auto, not {self.kv_offload!r}")
        if self.prefill not in PREFILLS:
            raise OptionError(f"--prefill must be layer or serial, not {self.prefill!r}")
        _size("--max-gpu-memory", self.max_gpu_memory)
        self.kv_torch_dtype()

    def kv_torch_dtype(self):
        """--kv-dtype as a torch dtype (None: the model's)."""
        from lmqa.engine.block_store import parse_kv_dtype

        try:
            return None if self.kv_dtype is None else parse_kv_dtype(self.kv_dtype)
        except ValueError as e:
            raise OptionError(f"--kv-dtype: {e}") from None

    def engine(self, loaded: LoadedModel) -> LandmarkEngine:
        """A new, empty engine over the loaded model with these options."""
        from lmqa.engine.landmark_engine import LandmarkEngine

        return LandmarkEngine(loaded.model, loaded.landmark, offload=self.kv_offload, kv_dtype=self.kv_torch_dtype(),
                              prefill=self.prefill, max_device_bytes=_size("--max-gpu-memory", self.max_gpu_memory))


@dataclass(frozen=True)
class ReadOptions:
    """How a path becomes a document: --include/--exclude (codebases),
    --keep-boilerplate (Project Gutenberg files) and --max-memory (the
    key/value budget past which it is read through a file on disk)."""

    include: tuple[str, ...] | None = ()
    exclude: tuple[str, ...] | None = ()
    keep_boilerplate: bool = False
    max_memory: str = "auto"

    def __post_init__(self):
        for name in ("include", "exclude"):  # Typer gives a list, or None when the flag is absent
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        self.memory_limit()

    def memory_limit(self) -> int | None:
        """--max-memory in bytes (None: auto)."""
        return _size("--max-memory", self.max_memory)


@dataclass(frozen=True)
class SessionOptions:
    """Everything that turns a path into a session ready for questions."""

    read: ReadOptions
    model: ModelOptions
    engine: EngineOptions


@dataclass(frozen=True)
class AnswerOptions:
    """How each question is answered: sampling (--max-new-tokens,
    --temperature, --seed, --candidates) and --quote/--no-quote."""

    sampling: SamplingConfig
    quote: bool = True
