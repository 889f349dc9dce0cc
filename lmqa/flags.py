"""The flags shared by several commands, declared once, and how a command
turns its flags into the options objects of lmqa/options.py.

cli.py's commands and `lmqa serve` (lmqa/serve/command.py) take the flags
from here, each with its help text and LMQA_* environment variable. A flag's
parameter is named as the options field it sets (--kv-offload: kv_offload),
so options_of builds an options object from whichever of its flags a
command offers; the ones it does not offer keep the field's default.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Optional, TypeVar

import typer

from lmqa.options import AnswerOptions, EngineOptions, ModelOptions, ReadOptions, SessionOptions
from lmqa.terminal import UserError

T = TypeVar("T")

# ModelOptions
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Manifest name (see `lmqa models list`), hf:ORG/NAME[@REV], Hugging Face or `lmqa train` directory, or .gguf file. Default: the shipped landmark model.", envvar="LMQA_MODEL")]
QuantOpt = Annotated[str, typer.Option("--quantize", "-q", help="Weights: none, int8 or nf4 (bitsandbytes).", envvar="LMQA_QUANTIZE")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.", envvar="LMQA_DEVICE")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Blocks retrieved per head and step (default: the model's).", envvar="LMQA_TOP_K")]
BlockOpt = Annotated[Optional[int], typer.Option("--block-size", min=2, help="Tokens per block (only for models not trained with landmarks).", envvar="LMQA_BLOCK_SIZE")]

# EngineOptions
OffloadOpt = Annotated[str, typer.Option("--kv-offload", help="Where block keys/values live: cpu (host memory), device, or auto (on the GPU while they fit --max-gpu-memory, else host memory; host memory on a CPU).", envvar="LMQA_KV_OFFLOAD")]
PrefillOpt = Annotated[str, typer.Option("--prefill", help="layer (whole input one layer at a time: fast) or serial (chunk by chunk through all layers: the reference).", envvar="LMQA_PREFILL")]
MaxGpuOpt = Annotated[str, typer.Option("--max-gpu-memory", help="With --kv-offload auto: GPU memory block keys/values may take (e.g. 20GiB); auto = half the GPU memory free at start.", envvar="LMQA_MAX_GPU_MEMORY")]
KvDtypeOpt = Annotated[Optional[str], typer.Option("--kv-dtype", help="How block keys/values are kept on the host: fp32, fp16, bf16 or int8 (default: the model's dtype; a context file keeps its own).", envvar="LMQA_KV_DTYPE")]

# ReadOptions
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="Codebases: read only files matching this .gitignore-style glob (repeatable).")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Codebases: skip files and directories matching this .gitignore-style glob (repeatable).")]
BoilerplateOpt = Annotated[bool, typer.Option("--keep-boilerplate", help="Text files: keep a Project Gutenberg header and licence (cut by default: they are no part of the book, and their text would win answers).")]
MaxMemoryOpt = Annotated[str, typer.Option("--max-memory", help="Key/value memory to use (e.g. 4GiB, 512M; auto = 80% of the free memory where blocks live). A document whose cache exceeds it is read through a temporary file on disk; ingest always streams to its file.", envvar="LMQA_MAX_MEMORY")]

# AnswerOptions
CandidatesOpt = Annotated[int, typer.Option("--candidates", "-c", min=1, help="Greedy answers: complete this many candidates (one from each of the likeliest first tokens) and give the likeliest whole answer; 1 = plain greedy, streamed as generated.", envvar="LMQA_CANDIDATES")]
QuoteOpt = Annotated[bool, typer.Option("--quote/--no-quote", help="Documents: hold the answer to a verbatim passage of the document (as the default model is trained to answer: no invented details), or let the model use its own words. Codebases: answer with a definition of the symbol index (name, file:line, signature), or in the model's own words.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling (with --temperature above 0).")]


def integers(text: str, flag: str, least: int, what: str, unit: str = "") -> list[int]:
    """A comma-separated flag value as integers of at least `least`, or a
    one-line UserError ("--lengths needs lengths of at least 64 tokens":
    what="lengths", unit="tokens")."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, not {text!r}") from None
    if not values or min(values) < least:
        raise UserError(f"{flag} needs {what} of at least {least}" + (f" {unit}" if unit else ""))
    return values


def options_of(ctx: typer.Context, cls: type[T], **given) -> T:
    """cls (a dataclass) from the command's flags named as its fields, -v
    (the app's own flag: `lmqa -v ask ...`) included; given: values the
    command decided itself, over its flags."""
    flags: dict = {}
    while ctx is not None:  # the command's own flags win over its parents'
        flags = {**ctx.params, **flags}
        ctx = ctx.parent
    return cls(**{**{f.name: flags[f.name] for f in fields(cls) if f.name in flags}, **given})


def session_options(ctx: typer.Context) -> SessionOptions:
    """What ask, chat, ingest and serve read, load and keep, from their flags."""
    return SessionOptions(read=options_of(ctx, ReadOptions), model=options_of(ctx, ModelOptions),
                          engine=options_of(ctx, EngineOptions))


def answer_options(ctx: typer.Context) -> AnswerOptions:
    """How ask, chat and serve answer, from their flags."""
    from lmqa.engine.generation import SamplingConfig

    return AnswerOptions(sampling=options_of(ctx, SamplingConfig), quote=ctx.params["quote"])
