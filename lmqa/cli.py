"""The `lmqa` command line."""

from __future__ import annotations

import functools
import os
import random
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__

app = typer.Typer(help="Ask questions about whole books and codebases with landmark attention.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="List and fetch models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)


class UserError(Exception):
    """Bad input: reported as one line, exit code 1, no traceback."""


def friendly(fn):
    """Turn expected failures into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .manifest import ModelError

        try:
            return fn(*args, **kwargs)
        except (UserError, ModelError) as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)
        except MemoryError:
            err.print("[red]error:[/red] out of memory: try a shorter input, --quantize nf4 or --kv-offload cpu")
            raise typer.Exit(1)

    return wrapper


def _version(value: bool):
    if value:
        console.print(f"lmqa {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """lmqa holds a whole document in one context cut into landmark blocks, and
    retrieves the few blocks each layer needs for every step."""


# ----- shared model options -----
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Manifest name (see `lmqa models list`), Hugging Face directory or .gguf file. Default: the shipped landmark model.")]
QuantOpt = Annotated[str, typer.Option("--quantize", "-q", help="Weights: none, int8 or nf4 (bitsandbytes).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
OffloadOpt = Annotated[str, typer.Option("--kv-offload", help="Where block keys/values live: cpu (host memory) or device.")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Blocks retrieved per head and step (default: the model's).")]
BlockOpt = Annotated[Optional[int], typer.Option("--block-size", min=2, help="Tokens per block (only for models not trained with landmarks).")]


def _load(model, quantize, device, top_k, block_size):
    from transformers.utils import logging as hf_logging

    from .loading import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with err.status("loading model"):
        loaded = load_model(model, quantize=quantize, device=device, top_k=top_k, block_size=block_size,
                            log=lambda m: err.print(f"[dim]{m}[/dim]"))
    if not loaded.trained:
        err.print(f"[yellow]note:[/yellow] {loaded.name} was not trained with landmarks; retrieval will be weak")
    return loaded


def _engine(loaded, offload):
    from .engine import LandmarkEngine

    if offload not in ("cpu", "device"):
        raise UserError(f"--kv-offload must be cpu or device, not {offload!r}")
    return LandmarkEngine(loaded.model, loaded.landmark, offload=offload)


def _prefill_bar(total: int, label: str):
    """A rich progress bar with tokens/s; returns (progress, advance callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"),
                        TimeRemainingColumn(), console=err, transient=True)
    task = progress.add_task(label, total=total, rate="")
    start = time.perf_counter()

    def advance(n: int):
        progress.advance(task, n)
        done = progress.tasks[0].completed
        progress.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")

    return progress, advance


# ----- passkey -----
@app.command()
@friendly
def passkey(
    length: Annotated[int, typer.Option("--length", "-n", help="Prompt length in tokens.")] = 32000,
    trials: Annotated[int, typer.Option("--trials", "-t", min=1, help="Prompts per length.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for keys and depths.")] = 0,
    depth: Annotated[Optional[float], typer.Option("--depth", "-d", min=0.0, max=1.0, help="Key position as a fraction of the prompt (default: random).")] = None,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "cpu", top_k: TopKOpt = None, block_size: BlockOpt = None,
):
    """The paper's passkey retrieval test: find a number hidden in LENGTH tokens of filler."""
    from .generation import SamplingConfig, StreamDecoder, generate
    from .passkey import first_integer, make_case

    if length < 64:
        raise UserError(f"--length {length} is too small: use at least 64 tokens")
    loaded = _load(model, quantize, device, top_k, block_size)
    engine = _engine(loaded, kv_offload)
    tok = loaded.tokenizer
    rng = random.Random(seed)
    table = Table(title=f"passkey retrieval, {loaded.name}, k={loaded.landmark.top_k}, b={loaded.landmark.block_size}")
    for col in ("trial", "tokens", "depth", "key", "answer", "ok", "prefill tok/s"):
        table.add_column(col, justify="right")
    correct = 0
    for trial in range(trials):
        case = make_case(tok, length, rng, depth)
        ids = tok(case.prompt).input_ids
        engine.reset()
        decoder = StreamDecoder(tok)
        progress, advance = _prefill_bar(len(ids) + len(ids) // loaded.landmark.block_size, f"trial {trial + 1}/{trials}")
        start = time.perf_counter()
        with progress:
            out = generate(engine, ids, SamplingConfig(max_new_tokens=8), {tok.eos_token_id},
                           on_token=decoder.push, on_prefill=advance)
        elapsed = time.perf_counter() - start
        answer = first_integer(tok.decode(out, skip_special_tokens=True))
        ok = answer == case.key
        correct += ok
        table.add_row(str(trial + 1), f"{case.n_tokens:,}", f"{case.depth:.2f}", str(case.key), str(answer),
                      "[green]yes[/green]" if ok else "[red]no[/red]", f"{case.n_tokens / elapsed:,.0f}")
        err.print(f"trial {trial + 1}: key {case.key}, answer {answer} ({'ok' if ok else 'wrong'}), {elapsed:.1f} s")
    console.print(table)
    console.print(f"accuracy: {correct}/{trials} = {100 * correct / trials:.0f}% at {length:,} tokens")


# ----- ask -----
def _read_text(path: Path) -> str:
    if str(path) == "-":
        text = sys.stdin.read()
    else:
        if not path.exists():
            raise UserError(f"{path}: no such file")
        if path.is_dir():
            raise UserError(f"{path} is a directory: give a text file")
        raw = path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text and "\ufffd" not in raw.decode("utf-8", errors="ignore"):
            err.print(f"[yellow]note:[/yellow] {path} is not valid UTF-8; undecodable bytes were replaced")
    if not text.strip():
        raise UserError(f"{path}: the document is empty")
    return text


def build_prompt(loaded, document: str, question: str) -> tuple[list[int], int]:
    """Token ids of the QA prompt and how many of them precede the document."""
    from .prompts import template

    tok = loaded.tokenizer
    user = template("qa_document").replace("{document}", "\x00") + "\n\n" + template("qa_question").format(question=question)
    if loaded.prompt_format == "chat" and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    else:
        text = user + "\nAnswer:"
    head, tail = text.split("\x00")
    head_ids = tok(head, add_special_tokens=False).input_ids
    return head_ids + tok(document, add_special_tokens=False).input_ids + tok(tail, add_special_tokens=False).input_ids, len(head_ids)


@app.command()
@friendly
def ask(
    path: Annotated[Path, typer.Argument(help="A plain-text file, or - for standard input.")],
    question: Annotated[str, typer.Argument(help="The question to answer from the document.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer, in tokens.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    show_blocks: Annotated[int, typer.Option("--show-blocks", min=0, help="Blocks to list per layer.")] = 3,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "cpu", top_k: TopKOpt = None, block_size: BlockOpt = None,
):
    """Ingest a document as one landmark context and answer QUESTION, showing which blocks each layer retrieved."""
    from .generation import SamplingConfig, StreamDecoder, generate
    from .retrieval_summary import summarize

    if not question.strip():
        raise UserError("the question is empty")
    text = _read_text(path)
    loaded = _load(model, quantize, device, top_k, block_size)
    engine = _engine(loaded, kv_offload)
    tok = loaded.tokenizer
    ids, doc_start = build_prompt(loaded, text, question)
    err.print(f"[dim]{len(ids):,} tokens, {len(ids) // loaded.landmark.block_size:,} blocks[/dim]")
    progress, advance = _prefill_bar(len(ids) + len(ids) // loaded.landmark.block_size, "reading")
    decoder = StreamDecoder(tok)
    times = {"start": time.perf_counter()}

    def on_token(t: int):
        times.setdefault("first", time.perf_counter())
        console.print(decoder.push(t), end="", soft_wrap=True, highlight=False, markup=False)

    with progress:
        out = generate(engine, ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
                       {tok.eos_token_id, *([tok.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tok.get_vocab() else [])},
                       on_token=lambda t: (progress.stop(), on_token(t)), on_prefill=advance)
    end = time.perf_counter()
    console.print()
    first = times.get("first", end)
    err.print(f"[dim]prefill {first - times['start']:.1f} s ({len(ids) / max(first - times['start'], 1e-9):,.0f} tok/s), "
              f"{len(out)} tokens in {end - first:.1f} s[/dim]")
    if show_blocks:
        console.print(summarize(engine, tok, ids, doc_start, show_blocks))


# ----- models -----
@models_app.command("list")
@friendly
def models_list():
    """Shipped model manifests, with whether each is trained with landmarks and cached here."""
    from .loading import CACHE_DIR
    from .manifest import DEFAULT_MODEL, list_manifests

    table = Table(title="models", caption="* the default of every command")
    for col in ("name", "landmarks", "b", "k", "train ctx", "cached"):
        table.add_column(col, no_wrap=True)
    for m in list_manifests():
        cached = (CACHE_DIR / "converted" / m.base.member_sha256[:16]).is_dir()
        table.add_row(m.name + (" *" if m.name == DEFAULT_MODEL else ""), "trained" if m.trained else "no",
                      str(m.block_size), str(m.top_k), str(m.train_context), "yes" if cached else "no")
    console.print(table)


@models_app.command("pull")
@friendly
def models_pull(name: Annotated[Optional[str], typer.Argument(help="Manifest name (default: the default model).")] = None):
    """Fetch, verify and convert a model's base weights now, so the first question does not wait."""
    from .loading import cached_base
    from .manifest import DEFAULT_MODEL, find_manifest, list_manifests

    manifest = find_manifest(name or DEFAULT_MODEL)
    if manifest is None:
        known = ", ".join(m.name for m in list_manifests())
        raise UserError(f"unknown model {name!r}: known models are {known}")
    where = cached_base(manifest, log=lambda m: err.print(f"[dim]{m}[/dim]"))
    console.print(f"{manifest.name}: base weights ready in {where}")


# ----- bench -----
@app.command()
@friendly
def bench(
    lengths: Annotated[str, typer.Option("--lengths", help="Comma-separated context lengths in tokens.")] = "2000,8000,32000",
    max_full: Annotated[int, typer.Option("--max-full", help="Skip full attention past this length (its prefill is quadratic).")] = 32000,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens decoded per measurement.")] = 16,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "cpu", top_k: TopKOpt = None,
):
    """Engine vs transformers' full attention: prefill tokens/s, decode ms/token and memory, in one run."""
    from .bench import bench_engine, bench_full, prompt_ids

    try:
        sizes = [int(x) for x in lengths.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths must be comma-separated integers, not {lengths!r}") from None
    if not sizes or min(sizes) < 64:
        raise UserError("--lengths needs lengths of at least 64 tokens")
    loaded = _load(model, quantize, device, top_k, None)
    engine = _engine(loaded, kv_offload)
    engine.feed(prompt_ids(loaded.tokenizer, 256, seed))  # warm-up: first calls allocate and pick kernels
    rows = []
    for n in sizes:
        ids = prompt_ids(loaded.tokenizer, n, seed)
        with err.status(f"landmark engine at {n:,} tokens"):
            rows.append(bench_engine(engine, ids, new_tokens))
        if n <= max_full:
            with err.status(f"full attention at {n:,} tokens"):
                rows.append(bench_full(loaded.model, ids, new_tokens))
    table = Table(title=f"lmqa bench: {loaded.name}, k={loaded.landmark.top_k}, b={loaded.landmark.block_size}, "
                        f"{torch_threads()} threads, device {engine.device}")
    for col in ("method", "tokens", "prefill tok/s", "decode ms/token", "peak MiB", "KV cache MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.method, f"{r.tokens:,}", f"{r.prefill_tok_s:,.0f}", f"{r.decode_ms:,.1f}",
                      f"{r.peak_mib:,.0f}", f"{r.cache_mib:,.1f}")
    console.print(table)
    engine_rows = [r for r in rows if r.method == "landmark"]
    first, last = engine_rows[0], engine_rows[-1]
    console.print(f"engine decode at {last.tokens:,} tokens is {last.decode_ms / first.decode_ms:.2f}x that at {first.tokens:,}")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ----- train -----
@app.command("train")
@friendly
def train_command(
    data: Annotated[list[Path], typer.Argument(help="Text files or directories (books, source trees), or a tokens .safetensors made by --tokenize-only.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for checkpoints, the adapter, losses and the loss plot. Rerunning resumes.")],
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1000,
    context: Annotated[int, typer.Option(min=32, help="Training context in positions (landmarks included).")] = 1024,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step and device.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 5e-4,
    synthetic_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of synthetic long-range retrieval examples.")] = 0.5,
    lora_rank: Annotated[int, typer.Option(min=1, help="LoRA rank on all attention and MLP projections.")] = 16,
    attention_tile: Annotated[Optional[int], typer.Option(min=1, help="Query blocks per attention tile (memory-efficient grouped softmax).")] = 4,
    save_every: Annotated[int, typer.Option(min=1, help="Checkpoint interval in steps.")] = 100,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop with a checkpoint after this many minutes.")] = None,
    tokenize_only: Annotated[Optional[Path], typer.Option(help="Only tokenize DATA into this .safetensors file and exit.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    model: ModelOpt = None, device: DeviceOpt = "auto", block_size: BlockOpt = None,
):
    """Fine-tune a LLaMA-family model with landmark tokens (LoRA + landmark embedding)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .train import TrainConfig, add_lora, export_adapter, plot_losses, train
    from .train_data import ExampleSampler, load_stream, tokenize_corpus

    base = model or "smollm2-135m"
    loaded = _load(base, "none", device, None, block_size)
    tok = loaded.tokenizer
    if len(data) == 1 and data[0].suffix == ".safetensors":
        if not data[0].is_file():
            raise UserError(f"{data[0]}: no such file")
        stream = load_stream(data[0])
    else:
        for p in data:
            if not p.exists():
                raise UserError(f"{p}: no such file or directory")
        with err.status("tokenizing training data"):
            stream = tokenize_corpus(data, tok, tokenize_only)
        if tokenize_only:
            console.print(f"wrote {len(stream):,} tokens to {tokenize_only}")
            return
    err.print(f"[dim]{len(stream):,} training tokens[/dim]")
    cfg = TrainConfig(output=output, steps=steps, context=context, block_size=loaded.landmark.block_size,
                      batch_size=batch_size, grad_accum=grad_accum, lr=lr, synthetic_rate=synthetic_rate,
                      lora_rank=lora_rank, lora_alpha=2 * lora_rank, save_every=save_every, seed=seed,
                      attention_tile=attention_tile, max_minutes=max_minutes)
    peft_model = add_lora(loaded.model, loaded.landmark.landmark_id, cfg.lora_rank, cfg.lora_alpha)
    sampler = ExampleSampler(stream, tok, cfg.n_ordinary, cfg.synthetic_rate, seed)
    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeRemainingColumn(), console=err)
    with bar:
        task = bar.add_task("train", total=steps, loss="-")
        losses = train(peft_model, sampler, loaded.landmark.landmark_id, cfg, log=err.print,
                       progress=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.3f}"))
    files = export_adapter(peft_model, output / "adapter",
                           {"base": base, "block_size": cfg.block_size, "top_k": loaded.landmark.top_k, "train_context": context})
    plot_losses(losses, output / "loss.png", f"landmark fine-tuning of {loaded.name}")
    (output / "losses.json").write_text(__import__("json").dumps(losses))
    console.print(f"trained {len(losses)} steps, last loss {losses[-1]:.3f}; adapter: {', '.join(str(f) for f in files)}")
