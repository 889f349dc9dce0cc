"""The `lmqa` command line: each command declares its flags, builds the
options objects of lmqa/options.py from them once, and calls one function
with them. Flags several commands share are declared in lmqa/flags.py;
sessions are opened in lmqa/sessions.py; `lmqa eval` and `lmqa serve` live
in their packages and register themselves here (evaluation/command.py,
serve/command.py)."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from lmqa import __version__
from lmqa.evaluation import command as evaluation_command
from lmqa.flags import (BlockOpt, BoilerplateOpt, CandidatesOpt, DeviceOpt, ExcludeOpt, IncludeOpt, KvDtypeOpt,
                        MaxGpuOpt, MaxMemoryOpt, ModelOpt, OffloadOpt, PrefillOpt, QuantOpt, QuoteOpt, SeedOpt, TopKOpt,
                        answer_options, integers, options_of, session_options)
from lmqa.options import AnswerOptions, EngineOptions, ModelOptions, SessionOptions
from lmqa.serve import command as serve_command
from lmqa.sessions import load_model, new_engine, open_session, over_budget, prepared_session, report_memory
from lmqa.terminal import UserError, check_output_path, console, err, friendly, prefill_bar, write_output

if TYPE_CHECKING:
    from lmqa.train.finetune import TrainConfig

app = typer.Typer(help="Ask questions about whole books and codebases with landmark attention.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="List and fetch models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _version(value: bool):
    if value:
        console.print(f"lmqa {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print where block keys/values live and how much memory they take.")] = False):
    """lmqa holds a whole document in one context cut into landmark blocks, and
    retrieves the few blocks each layer needs for every step."""
    # -v reaches each command's EngineOptions through options_of (lmqa/flags.py)


# ----- passkey -----
@app.command()
@friendly
def passkey(
    ctx: typer.Context,
    length: Annotated[int, typer.Option("--length", "-n", help="Prompt length in tokens.")] = 32000,
    trials: Annotated[int, typer.Option("--trials", "-t", min=1, help="Prompts per length.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for keys and depths.")] = 0,
    depth: Annotated[Optional[float], typer.Option("--depth", "-d", min=0.0, max=1.0, help="Key position as a fraction of the prompt (default: random).")] = None,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "auto", top_k: TopKOpt = None, block_size: BlockOpt = None,
    attention: Annotated[str, typer.Option("--attention", help="landmark (the engine) or full (transformers' own attention over the whole prompt: the baseline).")] = "landmark",
    prefill: PrefillOpt = "layer", max_gpu_memory: MaxGpuOpt = "auto",
):
    """The paper's passkey retrieval test: find a number hidden in LENGTH tokens of filler."""
    if length < 64:
        raise UserError(f"--length {length} is too small: use at least 64 tokens")
    if attention not in ("landmark", "full"):
        raise UserError(f"--attention must be landmark or full, not {attention!r}")
    _passkey(options_of(ctx, ModelOptions), options_of(ctx, EngineOptions), length=length, trials=trials, seed=seed,
             depth=depth, attention=attention)


def _passkey(model_options: ModelOptions, engine_options: EngineOptions, *, length: int, trials: int, seed: int,
             depth: Optional[float], attention: str) -> None:
    """`lmqa passkey`: the trials, a line each on stderr, then the table and the accuracy."""
    from lmqa.engine.generation import SamplingConfig, generate, generate_full_attention
    from lmqa.evaluation.passkey import first_integer, make_case

    loaded = load_model(model_options)
    engine = new_engine(loaded, engine_options)
    tok = loaded.tokenizer
    rng = random.Random(seed)
    how = f"k={loaded.landmark.top_k}, b={loaded.landmark.block_size}" if attention == "landmark" else "full attention"
    table = Table(title=f"passkey retrieval, {loaded.name}, {how}")
    for col in ("trial", "tokens", "depth", "key", "answer", "ok", "prefill tok/s"):
        table.add_column(col, justify="right")
    correct = 0
    for trial in range(trials):
        case = make_case(tok, length, rng, depth)
        ids = case.ids
        engine.reset()
        start = time.perf_counter()
        if attention == "full":
            with err.status(f"trial {trial + 1}/{trials}: full attention over {len(ids):,} tokens"):
                out = generate_full_attention(loaded.model, ids, 8, {tok.eos_token_id})
        else:
            progress, advance = prefill_bar(len(ids) + len(ids) // loaded.landmark.block_size, f"trial {trial + 1}/{trials}")
            with progress:
                out = generate(engine, ids, SamplingConfig(max_new_tokens=8), {tok.eos_token_id}, on_prefill=advance)
        elapsed = time.perf_counter() - start
        answer = first_integer(tok.decode(out, skip_special_tokens=True))
        ok = answer == case.key
        correct += ok
        table.add_row(str(trial + 1), f"{case.n_tokens:,}", f"{case.depth:.2f}", str(case.key), str(answer),
                      "[green]yes[/green]" if ok else "[red]no[/red]", f"{case.n_tokens / elapsed:,.0f}")
        err.print(f"trial {trial + 1}: key {case.key}, answer {answer} ({'ok' if ok else 'wrong'}), {elapsed:.1f} s")
        report_memory(engine, engine_options)
    console.print(table)
    console.print(f"accuracy: {correct}/{trials} = {100 * correct / trials:.0f}% at {length:,} tokens")


evaluation_command.register(app)  # `lmqa eval` (lmqa/evaluation/command.py); here, as --help lists in this order


# ----- ask -----
@app.command()
@friendly
def ask(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A document (.txt .md .rst .epub .pdf), a directory read as a codebase, - for standard input, or a context file from `lmqa ingest` (.lmqa).")],
    question: Annotated[str, typer.Argument(help="The question to answer from the document.")],
    include: IncludeOpt = None, exclude: ExcludeOpt = None, keep_boilerplate: BoilerplateOpt = False,
    max_memory: MaxMemoryOpt = "auto",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Longest answer, in tokens.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    show_blocks: Annotated[int, typer.Option("--show-blocks", min=0, help="Also list the N most retrieved blocks per layer, with file:line and snippet (default 0: only the evidence passages).")] = 0,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="Write the full retrieval trace (every step, layer and head: block ids, scores, sources) to this JSON file.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a layers x blocks retrieval heatmap, chapters or files marked, to this PNG file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result (answer, timings, evidence passages, retrieved spans with --show-blocks) and nothing else on stdout.")] = False,
    quote: QuoteOpt = True, candidates: CandidatesOpt = 4, seed: SeedOpt = None,
    kv_dtype: KvDtypeOpt = None,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "auto", top_k: TopKOpt = None, block_size: BlockOpt = None,
    prefill: PrefillOpt = "layer", max_gpu_memory: MaxGpuOpt = "auto",
):
    """Read a book or codebase into one landmark context and answer QUESTION, with the passages the answer read (file:line)."""
    from lmqa.qa.questions import question_problem

    problem = question_problem(question)
    if problem:
        raise UserError(problem)
    check_output_path(trace, "--trace")
    check_output_path(plot, "--plot")
    _ask(path, question, session_options(ctx), answer_options(ctx), show_blocks=show_blocks, trace=trace, plot=plot,
         as_json=as_json)


def _ask(path: Path, question: str, options: SessionOptions, answering: AnswerOptions, *, show_blocks: int,
         trace: Optional[Path], plot: Optional[Path], as_json: bool) -> None:
    """`lmqa ask`: the answer streamed to stdout, then its evidence (or one
    JSON result), the timings on stderr, and the trace and heatmap if asked."""
    from lmqa.engine.generation import StreamDecoder
    from lmqa.qa.evidence import passages
    from lmqa.qa.retrieval_summary import render_evidence, summarize
    from lmqa.qa.trace_export import result, trace as trace_of, write_json

    session = open_session(path, options, quote=answering.quote)
    decoder = StreamDecoder(session.loaded.tokenizer)

    def stream(t: int):
        console.print(decoder.push(t), end="", soft_wrap=True, highlight=False, markup=False)

    answer = session.ask(question, answering.sampling, on_token=None if as_json else stream)
    t = answer.timings
    if not as_json:
        console.print()
        console.print(render_evidence(passages(session, answer.evidence)))
    err.print(f"[dim]question prefill {t.prefill_s:.2f} s ({t.question_tokens} tokens), first token after "
              f"{t.first_token_s:.2f} s, {t.answer_tokens} tokens in {t.generate_s:.1f} s ({t.tokens_per_s:.1f} tok/s)[/dim]",
              soft_wrap=True)
    if trace is not None:
        write_output(trace, lambda p: write_json(p, trace_of(session, answer)))
        err.print(f"[dim]trace: {escape(str(trace))}[/dim]")
    if plot is not None:
        from lmqa.qa.heatmap import plot as plot_heatmap

        write_output(plot, lambda p: plot_heatmap(session, answer, p))
        err.print(f"[dim]heatmap: {escape(str(plot))}[/dim]")
    if as_json:
        print(json.dumps(result(session, answer, show_blocks), ensure_ascii=False))
    elif show_blocks:
        console.print(summarize(answer, show_blocks))


# ----- models -----
@models_app.command("list")
@friendly
def models_list():
    """Shipped model manifests, with whether each is trained with landmarks and cached here."""
    from lmqa.model.loading import CACHE_DIR, recovered
    from lmqa.model.manifest import DEFAULT_MODEL, list_manifests

    table = Table(title="models", caption=escape("* the default of every command; --model also takes hf:ORG/NAME[@REV] or DIR"))
    for col in ("name", "landmarks", "b", "k", "train ctx", "cached"):
        table.add_column(col, no_wrap=True)
    table.add_column("needs")
    for m in list_manifests():
        if m.diff is not None:
            cached = recovered(m) is not None
            needs = f"your base: `lmqa models pull {m.name} --base DIR`, DIR = {m.diff.base_description}"
        else:
            cached, needs = (CACHE_DIR / "converted" / m.base.member_sha256[:16]).is_dir(), "nothing (fetched on first use)"
        table.add_row(m.name + (" *" if m.name == DEFAULT_MODEL else ""), "trained" if m.trained else "no",
                      str(m.block_size), str(m.top_k), str(m.train_context), "yes" if cached else "no", needs)
    console.print(table)


@models_app.command("pull")
@friendly
def models_pull(
    name: Annotated[Optional[str], typer.Argument(help="Manifest name (default: the default model).")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Weight-diff models: your base model's Hugging Face directory (see `lmqa models list`).")] = None,
    diff: Annotated[Optional[Path], typer.Option("--diff", help="Weight-diff models: a local copy of the released diff instead of the hub's.")] = None,
):
    """Fetch, verify and convert a model's base weights now, so the first question does not wait;
    for a released weight diff, recover the model from your base weights."""
    from lmqa.model.loading import cached_base
    from lmqa.model.manifest import DEFAULT_MODEL, find_manifest, list_manifests

    manifest = find_manifest(name or DEFAULT_MODEL)
    if manifest is None:
        known = ", ".join(m.name for m in list_manifests())
        raise UserError(f"unknown model {name!r}: known models are {known}")
    log = lambda m: err.print(f"[dim]{m}[/dim]")  # noqa: E731
    if manifest.diff is None:
        if base or diff:
            raise UserError(f"--base and --diff are for weight-diff models; {manifest.name} is fetched by itself")
        console.print(f"{manifest.name}: base weights ready in {cached_base(manifest, log=log)}")
        return
    from lmqa.model.loading import recovered
    from lmqa.model.weight_diff import recover, verify_recovered

    if base is None:
        if verify_recovered(manifest):
            console.print(f"{manifest.name}: recovered weights ready (checksums verified) in {recovered(manifest)}")
            return
        raise UserError(f"{manifest.name} is a weight diff: pass --base DIR, DIR = {manifest.diff.base_description}")
    if diff is not None and not diff.is_dir():
        raise UserError(f"--diff {diff}: not a directory")
    where = recover(manifest, base, diff, log=log)
    console.print(f"{manifest.name}: recovered into {where} (parameter sum checked)")


# ----- bench -----
@app.command()
@friendly
def bench(
    ctx: typer.Context,
    lengths: Annotated[str, typer.Option("--lengths", help="Comma-separated context lengths in tokens.")] = "2000,8000,32000",
    max_full: Annotated[int, typer.Option("--max-full", min=0, help="Skip full attention past this length (its prefill is quadratic).")] = 32000,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens decoded per measurement.")] = 16,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "auto", top_k: TopKOpt = None,
    prefill: Annotated[str, typer.Option("--prefill", help="Engine prefill paths to measure: layer (layer-major), serial (chunk-serial, the reference), or both (layer,serial: their ratio in one run).")] = "layer",
    max_gpu_memory: MaxGpuOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows and ratios as one JSON object (no table cut to the terminal's width) and nothing else on stdout.")] = False,
    train: Annotated[bool, typer.Option("--train", help="Instead: positions/s of lmqa train's step with each grouped-softmax form beside SDPA causal attention, same LoRA model, random ids.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="With --train: sequences per step.")] = 16,
    context: Annotated[int, typer.Option(min=64, help="With --train: positions per sequence.")] = 2048,
    forms: Annotated[str, typer.Option("--forms", help="With --train: attention forms to time, of sdpa, fused, tiled.")] = "sdpa,fused,tiled",
    steps: Annotated[int, typer.Option(min=1, help="With --train: timed steps per form (after 2 warm-up steps).")] = 5,
    answers: Annotated[bool, typer.Option("--answers", help="Instead: seconds per question of each answer path (--answer-candidates) on --document cut to each of --lengths, read once as lmqa serve holds a context.")] = False,
    document: Annotated[Optional[Path], typer.Option("--document", help="With --answers: the text to ask about (repeated to reach a length).")] = None,
    questions: Annotated[Optional[list[str]], typer.Option("--question", help="With --answers: a question to time (repeatable; default: two about the story).")] = None,
    answer_candidates: Annotated[str, typer.Option("--answer-candidates", help="With --answers: the answer paths, as --candidates values (1 = one pass, N = search among N).")] = "4,1",
    fresh: Annotated[bool, typer.Option("--fresh", help="With --answers: also time each answer as a new `lmqa ask CTX.lmqa` process (model load, context file, answer).")] = False,
):
    """Engine vs transformers' full attention: prefill tokens/s, decode ms/token and memory, in one run.
    With --train: the training step's speed per attention form. With --answers: seconds per question per answer path."""
    if answers:
        from lmqa.evaluation.answer_bench import QUESTIONS

        paths = integers(answer_candidates, "--answer-candidates", 1, "values")
        if document is None or not document.is_file():
            raise UserError("--answers needs --document FILE: a text file to ask about")
        flags = [*(["--model", model] if model else []), *(["--top-k", str(top_k)] if top_k else []),
                 "--device", device, "--quantize", quantize, "--kv-offload", kv_offload]
        _bench_answers(options_of(ctx, ModelOptions), options_of(ctx, EngineOptions, prefill="layer"),
                       text=document.read_text(encoding="utf-8", errors="replace"),
                       lengths=integers(lengths, "--lengths", 256, "lengths", "tokens"), questions=tuple(questions or QUESTIONS),
                       candidates=paths, fresh_flags=flags if fresh else None, as_json=as_json)
        return
    if train:
        chosen = [f.strip() for f in forms.split(",") if f.strip()]
        if not chosen or set(chosen) - {"sdpa", "fused", "tiled"}:
            raise UserError(f"--forms must name some of sdpa, fused, tiled, not {forms!r}")
        _bench_train(ModelOptions(model=model or "smollm2-135m", device=device), forms=chosen, batch_size=batch_size,
                     context=context, steps=steps, as_json=as_json)
        return
    paths = ["layer", "serial"] if prefill.strip() == "both" else [p.strip() for p in prefill.split(",") if p.strip()]
    if not paths or set(paths) - {"layer", "serial"}:
        raise UserError(f"--prefill must be layer, serial, both or layer,serial, not {prefill!r}")
    engine_options = options_of(ctx, EngineOptions, prefill=paths[0])
    sizes = integers(lengths, "--lengths", 64, "lengths", "tokens")
    _bench(options_of(ctx, ModelOptions), engine_options, sizes=sizes, paths=paths, max_full=max_full,
           new_tokens=new_tokens, seed=seed, as_json=as_json)


def _bench_answers(model_options: ModelOptions, engine_options: EngineOptions, *, text: str, lengths: list[int],
                   questions: tuple[str, ...], candidates: list[int], fresh_flags: list[str] | None,
                   as_json: bool) -> None:
    """`lmqa bench --answers`: a table of median seconds per length and answer path, or every row as JSON."""
    from lmqa.evaluation.answer_bench import ANSWER_TOKENS, bench_answers, summary

    loaded = load_model(model_options)
    engine = new_engine(loaded, engine_options)
    with err.status("timing answers") as status:
        rows = bench_answers(loaded, engine, text, lengths, questions, candidates, ANSWER_TOKENS, fresh_flags,
                             status=lambda m: status.update(escape(m)))
    medians = summary(rows)
    if as_json:
        print(json.dumps({"model": loaded.name, "device": str(engine.device), "rows": [asdict(r) for r in rows],
                          "summary": medians}))
        return
    table = Table(title=f"lmqa bench --answers: {loaded.name}, device {engine.device}, median of "
                        f"{len(questions)} questions")
    for col in ("tokens", "answer path", "where", "seconds", "first token s", "answer tokens", "vs one pass"):
        table.add_column(col, justify="right")
    for m in medians:
        table.add_row(f"{m['tokens']:,}", "one pass" if m["candidates"] == 1 else f"search, -c {m['candidates']}",
                      "new ask process" if m["fresh"] else "context held",
                      f"{m['total_s']:.2f}", "-" if m["first_token_s"] is None else f"{m['first_token_s']:.2f}",
                      "-" if m["answer_tokens"] is None else f"{m['answer_tokens']:g}",
                      "-" if m["vs_one_pass"] is None else f"{m['vs_one_pass']:.1f}x")
    console.print(table)


def _bench(model_options: ModelOptions, engine_options: EngineOptions, *, sizes: list[int], paths: list[str],
           max_full: int, new_tokens: int, seed: int, as_json: bool) -> None:
    """`lmqa bench`: each prefill path of the engine, and full attention up
    to max_full tokens, at each length; a table, or the rows as JSON."""
    import torch

    from lmqa.engine.memory_budget import format_size
    from lmqa.evaluation.bench import bench_engine, bench_full, prompt_ids

    loaded = load_model(model_options)
    engine = new_engine(loaded, engine_options)
    for path in paths:  # warm-up: first calls allocate and pick kernels (on CUDA, bench_engine also compiles)
        engine.set_prefill(path)
        engine.feed(prompt_ids(loaded.tokenizer, 256, seed))
    rows = []
    for n in sizes:
        ids = prompt_ids(loaded.tokenizer, n, seed)
        for path in paths:
            engine.set_prefill(path)
            with err.status(f"landmark engine ({path} prefill) at {n:,} tokens"):
                rows.append(bench_engine(engine, ids, new_tokens))
        if n <= max_full:
            with err.status(f"full attention at {n:,} tokens"):
                rows.append(bench_full(loaded.model, ids, new_tokens))
    # decode at the longest length over the shortest, per engine path; layer-major over serial, per length
    growth = []
    for method in dict.fromkeys(r.method for r in rows if r.method != "full"):
        engine_rows = [r for r in rows if r.method == method]
        first, last = engine_rows[0], engine_rows[-1]
        growth.append({"method": method, "from": first.tokens, "to": last.tokens, "ratio": last.decode_ms / first.decode_ms})
    layer_vs_serial = []
    for n in sizes if len(paths) == 2 else ():
        by = {r.method: r for r in rows if r.tokens == n}
        layer, serial = by["landmark"], by["landmark-serial"]
        layer_vs_serial.append({"tokens": n, "prefill": layer.prefill_tok_s / serial.prefill_tok_s,
                                "decode": layer.decode_ms / serial.decode_ms})
    limit = engine.auto_offload.limit if engine.auto_offload is not None else None
    if as_json:
        print(json.dumps({
            "model": loaded.name, "top_k": loaded.landmark.top_k, "block_size": loaded.landmark.block_size,
            "threads": torch.get_num_threads(), "device": str(engine.device),
            "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
            "auto_offload_limit_bytes": limit, "rows": [asdict(r) for r in rows],
            "decode_growth": growth, "layer_vs_serial": layer_vs_serial,
        }))
        return
    table = Table(title=f"lmqa bench: {loaded.name}, k={loaded.landmark.top_k}, b={loaded.landmark.block_size}, "
                        f"{torch.get_num_threads()} threads, device {engine.device}")
    cuda = engine.device.type == "cuda"
    for col in ("method", "tokens", "prefill tok/s", "decode ms/token", "peak MiB", *(["GPU peak MiB"] * cuda),
                "KV cache MiB", "KV MiB device / host"):
        table.add_column(col, justify="right", no_wrap=col in ("method", "tokens"))
    for r in rows:
        table.add_row(r.method, f"{r.tokens:,}", f"{r.prefill_tok_s:,.0f}", f"{r.decode_ms:,.1f}", f"{r.peak_mib:,.0f}",
                      *([f"{r.gpu_peak_mib:,.0f}"] if cuda else []), f"{r.cache_mib:,.1f}",
                      f"{r.cache_device_mib:,.1f} / {r.cache_host_mib:,.1f}" if r.blocks_on else "-")
    console.print(table)
    if limit:
        console.print(f"--kv-offload auto: blocks on the device up to {format_size(limit)}, else in host memory")
    for g in growth:
        label = "engine" if g["method"] == "landmark" else f"engine ({g['method']})"
        console.print(f"{label} decode at {g['to']:,} tokens is {g['ratio']:.2f}x that at {g['from']:,}")
    for x in layer_vs_serial:
        console.print(f"layer-major prefill at {x['tokens']:,} tokens: {x['prefill']:.2f}x the chunk-serial one; "
                      f"decode {x['decode']:.2f}x")


def _bench_train(model_options: ModelOptions, *, forms: list[str], batch_size: int, context: int, steps: int,
                 as_json: bool) -> None:
    """`lmqa bench --train`: the training step's speed with each attention form on the same LoRA model."""
    import torch

    from lmqa.evaluation.train_bench import bench_train_step
    from lmqa.train.finetune import add_lora

    loaded = load_model(model_options)
    if "fused" in forms:
        _require_fused(loaded, "--forms fused", "leave it out (--forms sdpa,tiled)")
    peft_model = add_lora(loaded.model, loaded.landmark.landmark_id, 16, 32)
    rows = []
    for form in forms:
        with err.status(f"training steps with {form} attention, batch {batch_size} x {context}"):
            rows.append(bench_train_step(peft_model, form, loaded.landmark.block_size, batch_size, context, steps))
    base = next((r for r in rows if r.attention == "sdpa"), None)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and loaded.model.device.type == "cuda" else None
    if as_json:
        print(json.dumps({"model": loaded.name, "gpu": gpu, "rows": [asdict(r) for r in rows]}))
        return
    table = Table(title=f"lmqa bench --train: {loaded.name}, LoRA r16, {gpu or 'CPU'}")
    for col in ("attention", "batch x context", "ms/step", "positions/s", "vs sdpa", "GPU peak MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.attention, f"{r.batch} x {r.context}", f"{r.step_ms:,.0f}", f"{r.positions_s:,.0f}",
                      f"{r.positions_s / base.positions_s:.2f}x" if base else "-",
                      f"{r.gpu_peak_mib:,.0f}" if r.gpu_peak_mib is not None else "-")
    console.print(table)


def _require_fused(loaded, flag: str, instead: str) -> None:
    """A UserError (flag, then what to do instead) where the fused training kernels cannot run for loaded."""
    from lmqa.train.fused_attention import supported_by

    if not supported_by(loaded.model, loaded.landmark.block_size):
        raise UserError(f"{flag} needs Triton on a CUDA device and a block of 2^n - 1 tokens; {instead}")


# ----- train -----
@app.command("train")
@friendly
def train_command(
    data: Annotated[list[Path], typer.Argument(help="Text files or directories (books, source trees), or a tokens .safetensors made by --tokenize-only.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for checkpoints, the adapter, losses and the loss plot. Rerunning resumes.")],
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1000,
    context: Annotated[int, typer.Option(min=32, help="Training context in positions (landmarks included).")] = 1024,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per micro-step and process. A step's global batch is batch size x processes x grad accum.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps (micro-steps per step).")] = 1,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (cosine schedule).")] = 5e-4,
    synthetic_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of synthetic long-range retrieval examples.")] = 0.5,
    qa_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of document/codebase QA examples in the ask prompt format (taken before --synthetic-rate applies to the rest).")] = 0.0,
    book_qa_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of the QA examples asked about facts the training books state (their own sentences as answers; needs --qa-rate).")] = 0.0,
    code: Annotated[Optional[list[Path]], typer.Option(help="Python source directory for codebase QA examples (repeatable).")] = None,
    qa_data: Annotated[Optional[Path], typer.Option("--qa-data", help="Folder holding fairytaleqa/ and squad-dev/ (../shared/data/qa, or .carry/qa.tar.xz unpacked): human-written questions for --real-qa-rate (FairytaleQA train split; SQuAD less its held-out articles).")] = None,
    real_qa_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of examples asking --qa-data's human-written questions, half FairytaleQA, half SQuAD (taken before --qa-rate applies to the rest).")] = 0.0,
    init_adapter: Annotated[Optional[Path], typer.Option(help="Start the LoRA and landmark row from this adapter directory (adapter_model.safetensors of the same rank).")] = None,
    lora_rank: Annotated[int, typer.Option(min=1, help="LoRA rank on all attention and MLP projections.")] = 16,
    attention_tile: Annotated[Optional[int], typer.Option(min=1, help="Query blocks per attention tile of the torch form (memory-efficient grouped softmax).")] = 4,
    attention: Annotated[str, typer.Option("--attention", help="Grouped-softmax form: fused (Triton kernels, CUDA), tiled (torch, any device) or auto (fused where it runs).")] = "auto",
    save_every: Annotated[int, typer.Option(min=1, help="Checkpoint interval in steps.")] = 100,
    max_minutes: Annotated[Optional[float], typer.Option(min=0.0, help="Stop with a checkpoint after this many minutes.")] = None,
    tokenize_only: Annotated[Optional[Path], typer.Option(help="Only tokenize DATA into this .safetensors file and exit.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    model: ModelOpt = None, device: DeviceOpt = "auto", block_size: BlockOpt = None,
):
    """Fine-tune a LLaMA-family model with landmark tokens (LoRA + landmark embedding).
    On several GPUs: accelerate launch --num_processes N -m lmqa train ..."""
    from lmqa.train.attention_interface import FORMS
    from lmqa.train.finetune import TrainConfig

    if real_qa_rate and qa_data is None:
        raise UserError("--real-qa-rate needs --qa-data DIR (the folder holding fairytaleqa/ and squad-dev/)")
    if qa_data is not None and not real_qa_rate:
        raise UserError("--qa-data is used only with --real-qa-rate (the share of examples drawn from it)")
    if book_qa_rate and not qa_rate:
        raise UserError("--book-qa-rate is a share of the QA examples: give --qa-rate too")
    if attention not in FORMS:
        raise UserError(f"--attention must be one of {', '.join(FORMS)}, not {attention!r}")
    cfg = TrainConfig(output=output, steps=steps, context=context, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      synthetic_rate=synthetic_rate, lora_rank=lora_rank, lora_alpha=2 * lora_rank,
                      save_every=save_every, seed=seed, attention_tile=attention_tile, attention_form=attention,
                      max_minutes=max_minutes, qa_rate=qa_rate, book_qa_rate=book_qa_rate, real_qa_rate=real_qa_rate)
    _train(data, cfg, ModelOptions(model=model or "smollm2-135m", device=device, block_size=block_size), code=code,
           qa_data=qa_data, init_adapter=init_adapter, tokenize_only=tokenize_only)


def _train(data: list[Path], cfg: TrainConfig, model_options: ModelOptions, *, code: Optional[list[Path]],
           qa_data: Optional[Path], init_adapter: Optional[Path], tokenize_only: Optional[Path]) -> None:
    """`lmqa train`: the data read, the LoRA trained (resuming from OUTPUT's
    checkpoints) and the adapter exported; cfg.block_size is the model's."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lmqa.qa.session import KINDS, QAPrompt
    from lmqa.train.book_qa_data import BookQA, split_documents, training_books
    from lmqa.train.data import ExampleSampler, held_out, load_stream, tokenize_corpus
    from lmqa.train.finetune import (ResumeError, add_lora, export_adapter, load_adapter_weights, plot_losses,
                                     process_state, train)
    from lmqa.train.qa_data import QASampler, read_python_files
    from lmqa.train.real_qa_data import RealQASampler, load_real_qa

    fairytale = squad = None
    if qa_data is not None:
        try:
            fairytale, squad = load_real_qa(qa_data)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--qa-data: {e}") from None
    base = model_options.model
    state = process_state()  # under accelerate launch: selects this process's GPU before the model loads
    loaded = load_model(model_options)
    if cfg.attention_form == "fused":
        _require_fused(loaded, "--attention fused", "use --attention auto or tiled")
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
    cfg = replace(cfg, block_size=loaded.landmark.block_size)
    code_files = [f for d in code or [] for f in read_python_files(d)]
    if code and not code_files:
        raise UserError(f"no readable .py file under {', '.join(map(str, code))}")
    adapter_file = init_adapter / "adapter_model.safetensors" if init_adapter else None
    if adapter_file and not adapter_file.is_file():
        raise UserError(f"{init_adapter}: no adapter_model.safetensors there")
    cfg.output.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:  # every start or resume: what a model card must report
        with open(cfg.output / "runs.jsonl", "a") as fh:
            fh.write(json.dumps({"lmqa": __version__, "argv": sys.argv, "data": [str(p) for p in data], "model": base,
                                 "tokens": len(stream), **asdict(cfg), "num_processes": state.num_processes,
                                 "output": str(cfg.output),
                                 "code": [str(d) for d in code or []], "code_files": len(code_files),
                                 "qa_data": str(qa_data) if qa_data else None,
                                 "qa_data_questions": {"fairytaleqa": len(fairytale.questions) if fairytale else 0,
                                                       "squad": len(squad.questions) if squad else 0},
                                 "init_adapter": str(init_adapter) if init_adapter else None}, default=str) + "\n")
    torch.manual_seed(cfg.seed)  # the LoRA's initial weights too are a function of --seed
    peft_model = add_lora(loaded.model, loaded.landmark.landmark_id, cfg.lora_rank, cfg.lora_alpha)
    if adapter_file:
        try:
            load_adapter_weights(peft_model, adapter_file)
        except ValueError as e:  # another rank, targets or base
            raise UserError(f"--init-adapter: {e}") from None
    sampler = plain = ExampleSampler(stream, tok, cfg.n_ordinary, cfg.synthetic_rate, cfg.seed)
    if cfg.qa_rate:
        prompts = {kind: QAPrompt(loaded, kind) for kind in KINDS}
        book_qa = None
        if cfg.book_qa_rate:
            books = training_books(split_documents(stream, tok), held_out())
            if not books:
                raise UserError("--book-qa-rate: no book of 20,000 characters or more in the training data")
            book_qa = BookQA(books, lambda text: len(tok(text, add_special_tokens=False).input_ids))
        sampler = QASampler(sampler, prompts, cfg.qa_rate, code_files, book_qa=book_qa, book_rate=cfg.book_qa_rate)
    if cfg.real_qa_rate:
        sampler = RealQASampler(sampler, QAPrompt(loaded, "document"), cfg.real_qa_rate, fairytale, squad,
                                book_slice=plain._slice)
    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeRemainingColumn(), console=err, disable=not state.is_main_process)
    with bar:
        task = bar.add_task("train", total=cfg.steps, loss="-")
        try:
            losses = train(peft_model, sampler, loaded.landmark.landmark_id, cfg,
                           log=err.print if state.is_main_process else lambda m: None,
                           progress=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.3f}"))
        except ResumeError as e:
            raise UserError(str(e)) from None
    if not state.is_main_process:  # the main process alone writes the adapter, plot and losses
        return
    files = export_adapter(peft_model, cfg.output / "adapter",
                           {"base": str(Path(base).resolve()) if Path(base).is_dir() else base,  # any cwd
                            "block_size": cfg.block_size, "top_k": loaded.landmark.top_k, "train_context": cfg.context})
    plot_losses(losses, cfg.output / "loss.png", f"landmark fine-tuning of {loaded.name}")
    (cfg.output / "losses.json").write_text(json.dumps(losses))
    console.print(f"trained {len(losses)} steps, last loss {losses[-1]:.3f}; adapter: {', '.join(str(f) for f in files)}")


# ----- persisted contexts and chat -----
@app.command("ingest")
@friendly
def ingest_command(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A document (.txt .md .rst .epub .pdf), a directory read as a codebase, or - for standard input.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The context file to write (.lmqa is added if missing).")],
    include: IncludeOpt = None, exclude: ExcludeOpt = None, keep_boilerplate: BoilerplateOpt = False,
    max_memory: MaxMemoryOpt = "auto",
    kv_dtype: KvDtypeOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted ingest of the same document with the same model and settings from its last checkpoint.")] = False,
    checkpoint_size: Annotated[str, typer.Option("--checkpoint-size", help="Block keys/values written and checkpointed at a time (e.g. 64MiB): what ingest holds in memory besides the model and landmark keys.")] = "64MiB",
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "auto", block_size: BlockOpt = None,
):
    """Read a book or codebase once and save its landmark context, so `lmqa ask FILE.lmqa` and `lmqa chat FILE.lmqa` answer in seconds."""
    from lmqa.engine.memory_budget import parse_budget
    from lmqa.qa.context_file import SUFFIX

    output = output if output.suffix == SUFFIX else output.with_name(output.name + SUFFIX)
    check_output_path(output, "--output")
    try:
        piece_bytes = parse_budget(checkpoint_size)
    except ValueError as e:
        raise UserError(f"--checkpoint-size: {e}") from None
    if piece_bytes is None or piece_bytes < 1:
        raise UserError(f"--checkpoint-size must be a size of at least 1 byte, not {checkpoint_size!r}")
    _ingest(path, output, session_options(ctx), resume=resume, piece_bytes=piece_bytes)


def _ingest(path: Path, output: Path, options: SessionOptions, *, resume: bool, piece_bytes: int) -> None:
    """`lmqa ingest`: the document read into OUTPUT piece by piece (checkpointed, so --resume can continue)."""
    from lmqa.engine.memory_budget import format_size
    from lmqa.qa.context_file import ContextError
    from lmqa.qa.context_stream import ingest_file, partial_path, resident_bytes

    session, allowed = prepared_session(path, options)
    need = resident_bytes(session, piece_bytes) if session.engine.offload == "cpu" else session.cache_bytes()
    if need > allowed:
        raise over_budget(session, need, allowed)
    work = partial_path(output)
    interrupted = work.exists()
    if interrupted and not resume:
        err.print(f"[yellow]note:[/yellow] starting over; {escape(str(work))} holds an interrupted ingest "
                  f"(--resume continues it)", soft_wrap=True, highlight=False)
    progress, advance = prefill_bar(session.positions, "reading")
    try:
        with progress:
            streamed = ingest_file(session, output, resume, piece_bytes, advance)
    except KeyboardInterrupt:
        if work.exists():
            err.print(f"[yellow]note:[/yellow] the work so far is kept in {escape(str(work))}; run the same "
                      f"command with --resume to continue", soft_wrap=True, highlight=False)
        raise
    except OSError as e:
        raise UserError(f"{output}: could not write ({e.strerror or e})") from None
    except ContextError as e:
        raise UserError(str(e)) from None
    stats = streamed.stats
    if streamed.resumed_blocks:
        err.print(f"[dim]resumed after {streamed.resumed_blocks:,} blocks written by an earlier run[/dim]")
    elif resume and interrupted:
        err.print("[yellow]note:[/yellow] nothing to resume (another document, model or setting, or no piece "
                  "finished): started over")
    err.print(f"[dim]read {stats.tokens:,} tokens in {stats.seconds:.1f} s ({stats.tokens_per_s:,.0f} tok/s)[/dim]")
    console.print(f"wrote {output} ({format_size(output.stat().st_size)}): {session.engine.n_tokens:,} tokens, "
                  f"{session.engine.n_blocks:,} blocks; ask with `lmqa ask {output} \"...\"` or `lmqa chat {output}`",
                  soft_wrap=True, highlight=False, markup=False)


@app.command()
@friendly
def chat(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A context file from `lmqa ingest` (.lmqa), a document, a directory read as a codebase, or - for standard input.")],
    include: IncludeOpt = None, exclude: ExcludeOpt = None, keep_boilerplate: BoilerplateOpt = False,
    max_memory: MaxMemoryOpt = "auto",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Longest answer, in tokens.")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    show_blocks: Annotated[int, typer.Option("--show-blocks", min=1, help="Blocks per layer that /blocks lists.")] = 3,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the conversation from the start (/keep on).")] = False,
    quote: QuoteOpt = True, candidates: CandidatesOpt = 4, seed: SeedOpt = None,
    kv_dtype: KvDtypeOpt = None,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "auto", top_k: TopKOpt = None, block_size: BlockOpt = None,
):
    """Ask question after question about one document or context file (a REPL; /help lists its commands)."""
    _chat(path, session_options(ctx), answer_options(ctx), show_blocks=show_blocks, keep=keep)


def _chat(path: Path, options: SessionOptions, answering: AnswerOptions, *, show_blocks: int, keep: bool) -> None:
    """`lmqa chat`: the REPL over one session, its input history kept in the cache directory."""
    from lmqa.model.loading import CACHE_DIR
    from lmqa.qa.chat import Chat, ChatConfig, line_reader

    session = open_session(path, options, quote=answering.quote)
    config = ChatConfig(answering.sampling, show_blocks, keep, CACHE_DIR / "chat-history")
    Chat(session, config, console, err).run(line_reader(config.history))


serve_command.register(app)  # last: `lmqa --help` lists the commands in the order they are added
