"""The `lmqa` command line."""

from __future__ import annotations

import functools
import json
import logging
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
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
        from lmqa.model.manifest import ModelError

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


@dataclass
class EngineSettings:
    """Engine options that reach every command's engine without threading
    them through each helper: -v for all commands; --prefill and
    --max-gpu-memory where a command offers them."""

    verbose: bool = False
    prefill: str = "layer"
    max_gpu_memory: str = "auto"


ENGINE = EngineSettings()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print where block keys/values live and how much memory they take.")] = False):
    """lmqa holds a whole document in one context cut into landmark blocks, and
    retrieves the few blocks each layer needs for every step."""
    global ENGINE
    ENGINE = EngineSettings(verbose=verbose)


# ----- shared model options -----
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Manifest name (see `lmqa models list`), hf:ORG/NAME[@REV], Hugging Face or `lmqa train` directory, or .gguf file. Default: the shipped landmark model.", envvar="LMQA_MODEL")]
QuantOpt = Annotated[str, typer.Option("--quantize", "-q", help="Weights: none, int8 or nf4 (bitsandbytes).", envvar="LMQA_QUANTIZE")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.", envvar="LMQA_DEVICE")]
OffloadOpt = Annotated[str, typer.Option("--kv-offload", help="Where block keys/values live: cpu (host memory), device, or auto (on the GPU while they fit --max-gpu-memory, else host memory; host memory on a CPU).", envvar="LMQA_KV_OFFLOAD")]
PrefillOpt = Annotated[str, typer.Option("--prefill", help="layer (whole input one layer at a time: fast) or serial (chunk by chunk through all layers: the reference).", envvar="LMQA_PREFILL")]
MaxGpuOpt = Annotated[str, typer.Option("--max-gpu-memory", help="With --kv-offload auto: GPU memory block keys/values may take (e.g. 20GiB); auto = half the GPU memory free at start.", envvar="LMQA_MAX_GPU_MEMORY")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Blocks retrieved per head and step (default: the model's).", envvar="LMQA_TOP_K")]
CandidatesOpt = Annotated[int, typer.Option("--candidates", "-c", min=1, help="Greedy answers: complete this many candidates (one from each of the likeliest first tokens) and give the likeliest whole answer; 1 = plain greedy, streamed as generated.", envvar="LMQA_CANDIDATES")]
BlockOpt = Annotated[Optional[int], typer.Option("--block-size", min=2, help="Tokens per block (only for models not trained with landmarks).", envvar="LMQA_BLOCK_SIZE")]


def _load(model, quantize, device, top_k, block_size):
    from transformers.utils import logging as hf_logging

    from lmqa.model.loading import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Library chatter that says nothing actionable to a user: transformers'
    # deprecation notices and bitsandbytes' note that it cannot fetch an
    # optional CPU kernel from a hub (lmqa runs offline by design).
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with err.status("loading model"):
        loaded = load_model(model, quantize=quantize, device=device, top_k=top_k, block_size=block_size,
                            log=lambda m: err.print(f"[dim]{m}[/dim]"))
    if not loaded.trained:
        err.print(f"[yellow]note:[/yellow] {loaded.name} was not trained with landmarks; retrieval will be weak")
    return loaded


def _check_offload(offload: str) -> None:
    if offload not in ("cpu", "device", "auto"):
        raise UserError(f"--kv-offload must be cpu, device or auto, not {offload!r}")


def _engine_settings(prefill: str, max_gpu_memory: str) -> None:
    """Check and keep a command's --prefill and --max-gpu-memory for _engine."""
    from lmqa.engine.memory_budget import parse_budget

    if prefill not in ("layer", "serial"):
        raise UserError(f"--prefill must be layer or serial, not {prefill!r}")
    try:
        parse_budget(max_gpu_memory)
    except ValueError as e:
        raise UserError(f"--max-gpu-memory: {e}") from None
    ENGINE.prefill, ENGINE.max_gpu_memory = prefill, max_gpu_memory


def _engine(loaded, offload, kv_dtype=None):
    from lmqa.engine.landmark_engine import LandmarkEngine
    from lmqa.engine.memory_budget import format_size, parse_budget

    _check_offload(offload)
    engine = LandmarkEngine(loaded.model, loaded.landmark, offload=offload, kv_dtype=kv_dtype, prefill=ENGINE.prefill,
                            max_device_bytes=parse_budget(ENGINE.max_gpu_memory))
    if ENGINE.verbose:
        why = (f" (auto: on the device up to {format_size(engine.auto_offload.limit)})"
               if engine.auto_offload and engine.auto_offload.limit else "")
        err.print(f"[dim]block keys/values: {'device' if engine.offload == 'device' else 'host memory'}{why}; "
                  f"{ENGINE.prefill} prefill on {engine.device}[/dim]")
    return engine


def _report_memory(engine) -> None:
    """With -v: where the context's blocks ended up and what they take there."""
    from lmqa.engine.memory_budget import format_size

    if ENGINE.verbose:
        on = engine.memory()
        err.print(f"[dim]{engine.n_blocks:,} blocks, keys/values {'on the device' if engine.offload == 'device' else 'in host memory'}: "
                  f"{format_size(on['device'])} on the device, {format_size(on['host'])} in host memory[/dim]")


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
    kv_offload: OffloadOpt = "auto", top_k: TopKOpt = None, block_size: BlockOpt = None,
    attention: Annotated[str, typer.Option("--attention", help="landmark (the engine) or full (transformers' own attention over the whole prompt: the baseline).")] = "landmark",
    prefill: PrefillOpt = "layer", max_gpu_memory: MaxGpuOpt = "auto",
):
    """The paper's passkey retrieval test: find a number hidden in LENGTH tokens of filler."""
    from lmqa.engine.generation import SamplingConfig, generate, generate_full_attention
    from lmqa.evaluation.passkey import first_integer, make_case

    if length < 64:
        raise UserError(f"--length {length} is too small: use at least 64 tokens")
    if attention not in ("landmark", "full"):
        raise UserError(f"--attention must be landmark or full, not {attention!r}")
    _engine_settings(prefill, max_gpu_memory)
    loaded = _load(model, quantize, device, top_k, block_size)
    engine = _engine(loaded, kv_offload)
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
            progress, advance = _prefill_bar(len(ids) + len(ids) // loaded.landmark.block_size, f"trial {trial + 1}/{trials}")
            with progress:
                out = generate(engine, ids, SamplingConfig(max_new_tokens=8), {tok.eos_token_id}, on_prefill=advance)
        elapsed = time.perf_counter() - start
        answer = first_integer(tok.decode(out, skip_special_tokens=True))
        ok = answer == case.key
        correct += ok
        table.add_row(str(trial + 1), f"{case.n_tokens:,}", f"{case.depth:.2f}", str(case.key), str(answer),
                      "[green]yes[/green]" if ok else "[red]no[/red]", f"{case.n_tokens / elapsed:,.0f}")
        err.print(f"trial {trial + 1}: key {case.key}, answer {answer} ({'ok' if ok else 'wrong'}), {elapsed:.1f} s")
        _report_memory(engine)
    console.print(table)
    console.print(f"accuracy: {correct}/{trials} = {100 * correct / trials:.0f}% at {length:,} tokens")


# ----- eval -----
@app.command("eval")
@friendly
def eval_command(
    lengths: Annotated[str, typer.Option("--lengths", help="Comma-separated prompt lengths in tokens (needle, passkey and ruler tasks).")] = "4000,32000",
    depths: Annotated[str, typer.Option("--depths", help="Comma-separated depths of the fact, in percent of the document.")] = "0,25,50,75,100",
    trials: Annotated[int, typer.Option("--trials", "-t", min=1, help="Trials per length and depth (ruler: samples per task and length).")] = 2,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: needle (fact QA in eval books), passkey, code (questions about real source trees: where is X defined, what does Y, what calls X; with a BM25 baseline), bookqa (reader's questions on whole held-out books; not in the default), ruler (RULER's 11 synthetic tasks, or name some: niah_single_1, vt, cwe, ...; not in the default), fairytaleqa (FairytaleQA's questions on whole stories, ROUGE-L; not in the default), squad (SQuAD dev v1.1 and v2.0 on held-out articles, each paragraph inside --realqa-filler tokens of others, EM/F1 and refusals; not in the default).")] = "needle,passkey,code",
    seed: Annotated[int, typer.Option("--seed", help="Random seed for haystacks, needles, keys and placements (decoding is greedy).")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for eval.json (every trial), eval.txt (the table) and eval.png (the heatmap).")] = Path("lmqa-eval"),
    books: Annotated[Optional[Path], typer.Option("--books", help="Evaluation books (*.txt) for the needle haystacks (default: shared/books/eval of the repository).")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also run the base model over its window's worth of the prompt's end, and over all of it up to --max-full.")] = True,
    baseline_model: Annotated[str, typer.Option("--baseline-model", help="The model the baselines run (full attention, no landmarks).")] = "smollm2-135m",
    max_full: Annotated[int, typer.Option("--max-full", min=0, help="Run the full-attention baseline only on prompts up to this many tokens.")] = 8192,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Longest answer, in tokens.")] = 64,
    candidates: CandidatesOpt = 4,
    bookqa_dir: Annotated[Optional[Path], typer.Option("--bookqa-dir", help="Where the bookqa books are (default: shared/books/train of the repository).")] = None,
    bookqa_books: Annotated[Optional[str], typer.Option("--bookqa-books", help="Comma-separated bookqa books (file names or stems) to ask about (default: all).")] = None,
    bookqa_limit: Annotated[Optional[int], typer.Option("--bookqa-limit", min=1, help="Ask only the first N bookqa questions of each book.")] = None,
    realqa_dir: Annotated[Optional[Path], typer.Option("--realqa-dir", help="Where fairytaleqa/ and squad-dev/ are (default: shared/data/qa of the repository).")] = None,
    realqa_split: Annotated[str, typer.Option("--realqa-split", help="FairytaleQA split: test or val.")] = "test",
    realqa_limit: Annotated[Optional[int], typer.Option("--realqa-limit", min=1, help="Ask only N questions per set (fairytaleqa: spread over stories; squad: of each version), chosen by --seed.")] = None,
    realqa_filler: Annotated[int, typer.Option("--realqa-filler", min=0, help="squad: tokens of other paragraphs around the question's paragraph.")] = 4000,
    realqa_answer: Annotated[str, typer.Option("--realqa-answer", help="fairytaleqa/squad: comma-separated answer paths to score side by side (lmqa/evaluation/realqa.py ANSWER_PATHS; ask = lmqa ask's).")] = "ask",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON result (summary and every trial) and nothing else on stdout.")] = False,
    model: ModelOpt = None, quantize: QuantOpt = "none", device: DeviceOpt = "auto",
    kv_offload: OffloadOpt = "auto", top_k: TopKOpt = None,
):
    """Needle-QA, passkey and code grids (lengths x depths) with baselines: a table, a heatmap PNG and every trial as JSON."""
    from lmqa.evaluation.report import report, summarize, table, write_outputs
    from lmqa.evaluation.ruler import TASKS as RULER_TASKS
    from lmqa.evaluation.tasks import (TASKS, EvalError, Evaluator, Settings, books_dir, load_needles, parse_depths,
                           read_books)

    try:
        sizes = tuple(int(x) for x in lengths.split(",") if x.strip())
        chosen = tuple(t.strip() for t in tasks.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--lengths must be comma-separated integers, not {lengths!r}") from None
    if not sizes or min(sizes) < 256:
        raise UserError("--lengths needs lengths of at least 256 tokens")
    ruler_tasks = RULER_TASKS if "ruler" in chosen else tuple(t for t in chosen if t in RULER_TASKS)
    if not chosen or set(chosen) - set(TASKS) - {"code", "bookqa", "ruler", "fairytaleqa", "squad"} - set(RULER_TASKS):
        raise UserError(f"--tasks must name some of {', '.join(TASKS)}, code, bookqa, ruler (or its tasks), "
                        f"fairytaleqa, squad, not {tasks!r}")
    grid = tuple(t for t in chosen if t in TASKS)  # the tasks with lengths and depths
    _output_path(out, "--out")
    try:
        depth_values = parse_depths(depths)
        realqa = RealQA(realqa_dir, realqa_split, realqa_limit, realqa_filler, realqa_answer, seed, max_new_tokens,
                        candidates) if {"fairytaleqa", "squad"} & set(chosen) else None
        book_texts = read_books(books_dir(books)) if "needle" in chosen or ruler_tasks else []
        loaded = _load(model, quantize, device, top_k, None)
        engine = _engine(loaded, kv_offload)
        base = _load(baseline_model, quantize, device, None, None) if baselines and grid not in ((), ("passkey",)) else None
        window = base.model.config.max_position_embeddings if base is not None else 0
        settings = Settings(sizes, depth_values, trials, seed, grid, max_new_tokens, candidates, max_full, window)
        books_data = _bookqa(loaded, engine, out, bookqa_dir, bookqa_books, bookqa_limit, max_new_tokens,
                             candidates, as_json) if "bookqa" in chosen else None
        ruler_data = _ruler(loaded, engine, out, ruler_tasks, sizes, trials, seed, candidates, book_texts,
                            as_json) if ruler_tasks else None
        code_data = _code_eval(loaded, engine, out, max_new_tokens, candidates, as_json) if "code" in chosen else None
        fairytale_data = _fairytaleqa(loaded, engine, out, realqa, as_json) if "fairytaleqa" in chosen else None
        squad_data = _squad(loaded, engine, out, realqa, as_json) if "squad" in chosen else None
        extra = {"code": code_data, "bookqa": books_data, "ruler": ruler_data, "fairytaleqa": fairytale_data,
                 "squad": squad_data}
        evaluator = Evaluator(loaded, engine, settings, book_texts, load_needles(), base)
        progress, evaluator.progress = _prefill_bar(evaluator.positions(), "eval")
        done = []
        try:
            with progress:
                for cell in evaluator.cells():
                    for t in evaluator.run(*cell):
                        done.append(t)
                        evidence = "" if t.evidence_hit is None else f", evidence {'hit' if t.evidence_hit else 'missed'}"
                        err.print(f"[dim]{t.task} {t.length:,} depth {100 * t.depth:g}% #{t.trial + 1} {t.method}: "
                                  f"{'ok' if t.correct else 'wrong'}{evidence} in {t.seconds:.1f} s: "
                                  f"{escape(t.answer[:70])!r}[/dim]", soft_wrap=True, highlight=False)
        except KeyboardInterrupt:  # a long grid stopped by hand still reports the trials it finished
            if not done:
                raise
            err.print(f"[yellow]interrupted:[/yellow] reporting the {len(done)} trials done")
    except EvalError as e:
        raise UserError(str(e)) from None
    if not grid:
        if as_json:
            print(json.dumps({k: v for k, v in extra.items() if v is not None}, ensure_ascii=False))
        return
    rows = summarize(done)
    title = f"lmqa eval: {loaded.name}, k={loaded.landmark.top_k}, b={loaded.landmark.block_size}, seed {seed}"
    data = report(settings, done, loaded.name, base.name if base is not None else None)
    data.update({k: v for k, v in extra.items() if v is not None})
    try:
        paths = write_outputs(out, data, rows, title)
    except OSError as e:
        raise UserError(f"{out}: could not write the results ({e.strerror or e})") from None
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        console.print(table(rows, title))
    err.print(f"[dim]wrote {escape(', '.join(map(str, paths.values())))}[/dim]", soft_wrap=True)


def _save_results(out: Path, name: str, data: dict) -> None:
    """An eval task's results as OUT/name (JSON), said on stderr."""
    from lmqa.qa.trace_export import write_json

    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / name, data)
    except OSError as e:
        raise UserError(f"{out}: could not write the results ({e.strerror or e})") from None
    err.print(f"[dim]wrote {escape(str(out / name))}[/dim]", soft_wrap=True)


def _said_question(task: str, where, width: int):
    """The line an eval task prints per question: right, evidence and the
    BM25 baseline, time, question and the answer's first `width` characters
    (where: the result's tree or book)."""
    def said(r) -> None:
        err.print(f"[dim]{task} {escape(where(r))}: {'ok' if r.correct else 'wrong'}, evidence "
                  f"{'hit' if r.evidence_hit else 'missed'}, BM25 {'ok' if r.bm25_correct else 'wrong'} in "
                  f"{r.seconds:.1f} s: {escape(repr(r.question))} -> {escape(repr(r.answer[:width]))}[/dim]",
                  soft_wrap=True, highlight=False)

    return said


def _code_eval(loaded, engine, out: Path, max_new_tokens: int, candidates: int, as_json: bool) -> dict:
    """`lmqa eval --tasks code`: each source tree of prompts/code_questions.jsonl
    read and asked its questions; the table printed (unless --json) and
    OUT/code.json written."""
    from lmqa.engine.generation import SamplingConfig
    from lmqa.evaluation import code_eval

    questions = code_eval.load_questions()
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, candidates=candidates)
    results = []

    said = _said_question("code", lambda r: r.tree, 90)
    for tree in dict.fromkeys(q.tree for q in questions):
        results += code_eval.run_tree(tree, [q for q in questions if q.tree == tree], loaded, engine, sampling,
                                      lambda total: _prefill_bar(total, f"reading {tree}"), said)
    data = code_eval.report(results, loaded.name, sampling)
    _save_results(out, "code.json", data)
    if not as_json:
        console.print(code_eval.table(data["summary"], f"lmqa eval code: {loaded.name}, k={loaded.landmark.top_k}"))
    return data


def _bookqa(loaded, engine, out: Path, directory: Optional[Path], books: Optional[str], limit: Optional[int],
            max_new_tokens: int, candidates: int, as_json: bool) -> dict:
    """`lmqa eval --tasks bookqa`: every chosen book read whole (its context
    kept in OUT/contexts, so a rerun skips the prefill) and asked its
    questions; the table printed (unless --json) and OUT/bookqa.json written."""
    from lmqa.engine.generation import SamplingConfig
    from lmqa.evaluation import bookqa
    from lmqa.evaluation.tasks import books_dir

    names = [b.strip() for b in books.split(",") if b.strip()] if books is not None else None
    questions = bookqa.select(bookqa.load_questions(), names, limit)
    folder = books_dir(directory, bookqa.BOOKS, "--bookqa-dir")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, candidates=candidates)
    runs = []

    said = _said_question("bookqa", lambda r: r.book, 70)
    for book in dict.fromkeys(q.book for q in questions):
        path = folder / book
        if not path.is_file():
            raise UserError(f"{path}: no such book; pass --bookqa-dir DIR")
        runs.append(bookqa.run_book(path, [q for q in questions if q.book == book], loaded, engine, out / "contexts",
                                    sampling, lambda total: _prefill_bar(total, f"reading {book}"), said))
    data = bookqa.report(runs, loaded.name, sampling)
    _save_results(out, "bookqa.json", data)
    if not as_json:
        console.print(bookqa.table(data["summary"], f"lmqa eval bookqa: {loaded.name}, {sampling.candidates} candidates"))
    return data


@dataclass(frozen=True)
class RealQA:
    """The eval options of the fairytaleqa and squad tasks."""

    directory: Optional[Path]
    split: str
    limit: Optional[int]
    filler: int
    answer: str  # comma-separated answer paths
    seed: int
    max_new_tokens: int
    candidates: int

    def __post_init__(self):
        """Bad options fail here, before the model loads and other tasks run."""
        from lmqa.evaluation.realqa import SPLITS, data_dir
        from lmqa.evaluation.tasks import EvalError

        if self.split not in SPLITS:
            raise EvalError(f"--realqa-split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        data_dir(self.directory)
        self.paths()

    def paths(self):
        """The sampling settings and the named answer paths."""
        from lmqa.engine.generation import SamplingConfig
        from lmqa.evaluation.realqa import answer_paths

        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, candidates=self.candidates)
        return sampling, answer_paths([a.strip() for a in self.answer.split(",") if a.strip()], sampling)


def _said_realqa(task: str, width: int = 70):
    """The line the fairytaleqa and squad tasks print per question: each
    method's scores, the answer paths' time, the question and the first
    path's answer."""
    from lmqa.evaluation.realqa import BASELINE, said as scores_of

    def said(r) -> None:
        first = next(iter(r.replies.values()))
        seconds = sum(reply.seconds for name, reply in r.replies.items() if name != BASELINE)
        err.print(f"[dim]{task} {escape(r.group)} in {seconds:.1f} s: {escape(scores_of(r))}: "
                  f"{escape(repr(r.question))} -> {escape(repr(first.answer[:width]))}[/dim]",
                  soft_wrap=True, highlight=False)

    return said


def _realqa_done(out: Path, name: str, data: dict, title: str, as_json: bool) -> dict:
    """Save a fairytaleqa/squad result as OUT/name and print its table (unless --json)."""
    from lmqa.evaluation import realqa

    _save_results(out, name, data)
    if not as_json:
        console.print(realqa.table(data["summary"], title))
    return data


def _fairytaleqa(loaded, engine, out: Path, options: RealQA, as_json: bool) -> dict:
    """`lmqa eval --tasks fairytaleqa`: the chosen stories read whole (their
    contexts kept in OUT/contexts) and asked their questions; OUT/fairytaleqa.json."""
    from lmqa.evaluation import realqa

    sampling, paths = options.paths()
    questions, stories = realqa.fairytaleqa(realqa.data_dir(options.directory), options.split, options.limit,
                                            options.seed)
    runs = realqa.run_fairytaleqa(questions, stories, loaded, engine, paths, out,
                                  lambda total: _prefill_bar(total, "reading a story"), _said_realqa("fairytaleqa"))
    settings = {"split": options.split, "limit": options.limit, "seed": options.seed, "answer_paths": list(paths)}
    return _realqa_done(out, "fairytaleqa.json", realqa.report(runs, loaded.name, sampling, settings),
                        f"lmqa eval fairytaleqa: {loaded.name}, {options.split} split, seed {options.seed}", as_json)


def _squad(loaded, engine, out: Path, options: RealQA, as_json: bool) -> dict:
    """`lmqa eval --tasks squad`: SQuAD dev v1.1 and v2.0 questions on
    held-out articles, each asked of its paragraph among other paragraphs; OUT/squad.json."""
    from lmqa.evaluation import realqa

    sampling, paths = options.paths()
    root = realqa.data_dir(options.directory)
    runs = []
    for version in realqa.SQUAD_VERSIONS:
        dev = realqa.squad(root, version)
        questions = realqa.pick_squad(dev.questions, options.limit, options.seed)
        runs += realqa.run_squad(questions, dev.articles, loaded, engine, paths, options.filler, options.seed,
                                 lambda total: _prefill_bar(total, f"reading v{version}"), _said_realqa("squad"))
    settings = {"versions": list(realqa.SQUAD_VERSIONS), "limit": options.limit, "filler_tokens": options.filler,
                "seed": options.seed, "answer_paths": list(paths)}
    return _realqa_done(out, "squad.json", realqa.report(runs, loaded.name, sampling, settings),
                        f"lmqa eval squad: {loaded.name}, {options.filler:,} filler tokens, seed {options.seed}",
                        as_json)


def _ruler(loaded, engine, out: Path, tasks: tuple[str, ...], lengths: tuple[int, ...], samples: int, seed: int,
           candidates: int, books: list[str], as_json: bool) -> dict:
    """`lmqa eval --tasks ruler`: RULER's tasks at each length; the table
    printed (unless --json) and OUT/ruler.json written. Stopped by hand, it
    reports the samples it finished."""
    from lmqa.evaluation import ruler

    evaluator = ruler.RulerEvaluator(loaded, engine, lengths, samples, books, seed, candidates, tasks)
    progress, evaluator.progress = _prefill_bar(evaluator.positions(), "ruler")
    done = []
    try:
        with progress:
            for cell in evaluator.cells():
                t = evaluator.run(*cell)
                done.append(t)
                evidence = "" if t.evidence is None else f", evidence {100 * t.evidence:.0f}%"
                err.print(f"[dim]ruler {t.task} {t.length:,} #{t.sample + 1} ({t.answer_mode}): {100 * t.score:.0f}%"
                          f"{evidence} in {t.seconds:.1f} s: {escape(t.answer[:70])!r}[/dim]", soft_wrap=True,
                          highlight=False)
    except KeyboardInterrupt:
        if not done:
            raise
        err.print(f"[yellow]interrupted:[/yellow] reporting the {len(done)} ruler samples done")
    data = ruler.report(done, lengths, samples, seed)
    _save_results(out, "ruler.json", data)
    if not as_json:
        console.print(ruler.table(done, f"lmqa eval ruler: {loaded.name}, k={loaded.landmark.top_k}, "
                                        f"b={loaded.landmark.block_size}, seed {seed}"))
    return data


# ----- ask -----
def _output_path(path: Optional[Path], flag: str) -> None:
    """Fail before the prefill, not after it, when an output cannot be written."""
    if path is not None and not path.parent.is_dir():
        raise UserError(f"{flag} {path}: directory {path.parent} does not exist")


def _write_output(path: Path, write) -> None:
    try:
        write(path)
    except OSError as e:
        raise UserError(f"{path}: could not write ({e.strerror or e})") from None


def _ingest(path: Path, include: list[str], exclude: list[str], keep_boilerplate: bool = False):
    """The document, with its warnings and skipped files reported on stderr."""
    from .ingest import IngestError, ingest

    try:
        document = ingest(path, include, exclude, keep_boilerplate=keep_boilerplate)
    except IngestError as e:
        raise UserError(str(e)) from None
    for warning in document.warnings:
        err.print(f"[yellow]note:[/yellow] {escape(warning)}", soft_wrap=True, highlight=False)
    if document.skipped.total:
        err.print(f"[dim]skipped {document.skipped.total:,} path(s): "
                  f"{escape('; '.join(document.skipped.lines()))}[/dim]", soft_wrap=True, highlight=False)
    return document


KvDtypeOpt = Annotated[Optional[str], typer.Option("--kv-dtype", help="How block keys/values are kept on the host: fp32, fp16, bf16 or int8 (default: the model's dtype; a context file keeps its own).", envvar="LMQA_KV_DTYPE")]


def _kv_dtype(name: Optional[str]):
    from lmqa.engine.block_store import parse_kv_dtype

    try:
        return None if name is None else parse_kv_dtype(name)
    except ValueError as e:
        raise UserError(f"--kv-dtype: {e}") from None


def _open_context(path: Path, model, quantize, device, kv_offload, top_k, block_size, kv_dtype: Optional[str],
                  loader=_load):
    """A DocumentSession from a context file, with the model it was made with
    unless --model names another (which it must then match). loader: how
    the model is loaded (`lmqa serve` shares one among its contexts)."""
    from lmqa.qa.context_file import ContextError, load, peek

    try:
        info = peek(path)
        if _kv_dtype(kv_dtype) is not None and kv_dtype != info.kv_dtype:
            raise UserError(f"{path} keeps its keys/values in {info.kv_dtype}; --kv-dtype {kv_dtype} applies "
                            f"when ingesting: run `lmqa ingest` again with it")
        loaded = loader(model or info.model.name, quantize, device, top_k, block_size or info.settings.get("block_size"))
        _check_offload(kv_offload)
        with err.status("opening the context"):
            # auto: blocks are read in place from the file's map (host memory), never copied whole to a GPU
            session = load(path, loaded, "cpu" if kv_offload == "auto" else kv_offload)
    except ContextError as e:
        raise UserError(str(e)) from None
    err.print(f"[dim]{escape(str(path))}: {escape(session.document.source)}, {info.n_tokens:,} tokens, {info.n_blocks:,} "
              f"blocks, keys/values in {info.kv_dtype}, made with {escape(info.model.name)} (lmqa {info.lmqa_version})[/dim]",
              soft_wrap=True, highlight=False)
    return session


IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="Codebases: read only files matching this .gitignore-style glob (repeatable).")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Codebases: skip files and directories matching this .gitignore-style glob (repeatable).")]
BoilerplateOpt = Annotated[bool, typer.Option("--keep-boilerplate", help="Text files: keep a Project Gutenberg header and licence (cut by default: they are no part of the book, and their text would win answers).")]
QuoteOpt = Annotated[bool, typer.Option("--quote/--no-quote", help="Documents: hold the answer to a verbatim passage of the document (as the default model is trained to answer: no invented details), or let the model use its own words. Codebases: answer with a definition of the symbol index (name, file:line, signature), or in the model's own words.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling (with --temperature above 0).")]
MaxMemoryOpt = Annotated[str, typer.Option("--max-memory", help="Key/value memory to use (e.g. 4GiB, 512M; auto = 80% of the free memory where blocks live). A document whose cache exceeds it is read through a temporary file on disk; ingest always streams to its file.", envvar="LMQA_MAX_MEMORY")]


def _prepared_session(path: Path, include, exclude, max_memory: str, model, quantize, device, kv_offload, top_k,
                      block_size, kv_dtype=None, keep_boilerplate: bool = False, loader=_load):
    """A new DocumentSession for a document, tokenized and sized (tokens and
    estimated key/value cache, printed); returns it with the memory budget."""
    from lmqa.engine.memory_budget import budget, format_size, parse_budget
    from lmqa.qa.session import DocumentSession

    try:
        limit = parse_budget(max_memory)
    except ValueError as e:
        raise UserError(f"--max-memory: {e}") from None
    document = _ingest(path, include or [], exclude or [], keep_boilerplate)
    kind = "codebase" if path.is_dir() else "document"
    loaded = loader(model, quantize, device, top_k, block_size)
    engine = _engine(loaded, kv_offload, kv_dtype)
    session = DocumentSession(loaded, engine, document, kind)
    with err.status("tokenizing"):
        tokens = session.prepare()
    allowed = budget(limit, engine.device, kv_offload)
    parts = f"{len(document.segments):,} {'files' if kind == 'codebase' else 'parts'}, " if len(document.segments) > 1 else ""
    parts += f"{document.symbols.summary()}, " if document.symbols is not None else ""
    parts += "".join(f"dropped the {escape(d)}, " for d in document.dropped)
    err.print(f"[dim]{escape(document.source)}: {parts}{tokens:,} tokens, {len(session.sources):,} blocks of "
              f"{session.block_size}; estimated key/value cache {format_size(session.cache_bytes())} "
              f"(budget {format_size(allowed)})[/dim]", soft_wrap=True, highlight=False)
    return session, allowed


def _over_budget(session, need: int, allowed: int) -> UserError:
    from lmqa.engine.memory_budget import format_size

    return UserError(f"{session.document.source}: {session.prepare():,} tokens need an estimated {format_size(need)} "
                     f"of key/value memory, over the budget of {format_size(allowed)}; raise it with --max-memory "
                     f"(e.g. --max-memory {-(-need // (1 << 30)) + 1}GiB) or ask about a smaller part")


def _read_session(path: Path, include, exclude, max_memory: str, model, quantize, device, kv_offload, top_k,
                  block_size, kv_dtype=None, keep_boilerplate: bool = False, loader=_load):
    """Read a document into a new DocumentSession with a progress bar: in
    memory when its estimated cache fits the budget, else spilled to a
    temporary context file (see context_stream.py)."""
    from lmqa.qa.context_stream import fitting_piece_bytes, spill
    from lmqa.model.loading import CACHE_DIR

    session, allowed = _prepared_session(path, include, exclude, max_memory, model, quantize, device, kv_offload,
                                         top_k, block_size, kv_dtype, keep_boilerplate, loader)
    need = session.cache_bytes()
    piece_bytes = fitting_piece_bytes(session, allowed) if session.engine.offload == "cpu" else None  # device blocks stay put
    if need > allowed and piece_bytes is None:
        raise _over_budget(session, need, allowed)
    progress, advance = _prefill_bar(session.positions, "reading")
    if need <= allowed:
        with progress:
            stats = session.ingest(advance)
    else:
        err.print(f"[dim]over the budget: keeping the blocks in a temporary file in {escape(str(CACHE_DIR / 'spill'))}[/dim]",
                  soft_wrap=True, highlight=False)
        try:
            with progress:
                streamed = spill(session, CACHE_DIR / "spill", piece_bytes, advance)
        except OSError as e:
            raise UserError(f"could not write the temporary context file in {CACHE_DIR / 'spill'} "
                            f"({e.strerror or e})") from None
        session, stats = streamed.session, streamed.stats
    err.print(f"[dim]read {stats.tokens:,} tokens in {stats.seconds:.1f} s ({stats.tokens_per_s:,.0f} tok/s)[/dim]")
    return session


def _session(path: Path, include, exclude, max_memory: str, model, quantize, device, kv_offload, top_k,
             block_size, kv_dtype: Optional[str], keep_boilerplate: bool = False, loader=_load):
    """A DocumentSession for ask, chat and serve: opened from a context file, or read from the document."""
    from lmqa.qa.context_file import is_context_file

    if is_context_file(path):
        return _open_context(path, model, quantize, device, kv_offload, top_k, block_size, kv_dtype, loader)
    return _read_session(path, include, exclude, max_memory, model, quantize, device, kv_offload, top_k,
                         block_size, _kv_dtype(kv_dtype), keep_boilerplate, loader)


@app.command()
@friendly
def ask(
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
    from lmqa.qa.evidence import passages
    from lmqa.engine.generation import SamplingConfig, StreamDecoder
    from lmqa.qa.retrieval_summary import render_evidence, summarize
    from lmqa.qa.questions import question_problem
    from lmqa.qa.trace_export import result, trace as trace_of, write_json

    problem = question_problem(question)
    if problem:
        raise UserError(problem)
    _output_path(trace, "--trace")
    _output_path(plot, "--plot")
    _engine_settings(prefill, max_gpu_memory)
    session = _session(path, include, exclude, max_memory, model, quantize, device, kv_offload, top_k, block_size,
                       kv_dtype, keep_boilerplate)
    _report_memory(session.engine)
    session.quote = session.quote and quote

    decoder = StreamDecoder(session.loaded.tokenizer)

    def stream(t: int):
        console.print(decoder.push(t), end="", soft_wrap=True, highlight=False, markup=False)

    answer = session.ask(question, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                        candidates=candidates),
                         on_token=None if as_json else stream)
    t = answer.timings
    if not as_json:
        console.print()
        console.print(render_evidence(passages(session, answer.evidence)))
    err.print(f"[dim]question prefill {t.prefill_s:.2f} s ({t.question_tokens} tokens), first token after "
              f"{t.first_token_s:.2f} s, {t.answer_tokens} tokens in {t.generate_s:.1f} s ({t.tokens_per_s:.1f} tok/s)[/dim]",
              soft_wrap=True)
    if trace is not None:
        _write_output(trace, lambda p: write_json(p, trace_of(session, answer)))
        err.print(f"[dim]trace: {escape(str(trace))}[/dim]")
    if plot is not None:
        from lmqa.qa.heatmap import plot as plot_heatmap

        _write_output(plot, lambda p: plot_heatmap(session, answer, p))
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
    from lmqa.model.loading import CACHE_DIR
    from lmqa.model.manifest import DEFAULT_MODEL, list_manifests

    from lmqa.model.weight_diff import recovered

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
    from lmqa.model.weight_diff import recover, recovered, verify_recovered

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
):
    """Engine vs transformers' full attention: prefill tokens/s, decode ms/token and memory, in one run.
    With --train: the training step's speed per attention form."""
    from dataclasses import asdict

    import torch

    if train:
        return _bench_train(model, device, batch_size, context, forms, steps, as_json)

    from lmqa.evaluation.bench import bench_engine, bench_full, prompt_ids
    from lmqa.engine.memory_budget import format_size

    paths = ["layer", "serial"] if prefill.strip() == "both" else [p.strip() for p in prefill.split(",") if p.strip()]
    if not paths or set(paths) - {"layer", "serial"}:
        raise UserError(f"--prefill must be layer, serial, both or layer,serial, not {prefill!r}")
    _engine_settings(paths[0], max_gpu_memory)

    try:
        sizes = [int(x) for x in lengths.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths must be comma-separated integers, not {lengths!r}") from None
    if not sizes or min(sizes) < 64:
        raise UserError("--lengths needs lengths of at least 64 tokens")
    loaded = _load(model, quantize, device, top_k, None)
    engine = _engine(loaded, kv_offload)
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


def _bench_train(model, device, batch_size: int, context: int, forms: str, steps: int, as_json: bool) -> None:
    import torch

    from lmqa.evaluation.train_bench import bench_train_step
    from lmqa.train.finetune import add_lora

    chosen = [f.strip() for f in forms.split(",") if f.strip()]
    if not chosen or set(chosen) - {"sdpa", "fused", "tiled"}:
        raise UserError(f"--forms must name some of sdpa, fused, tiled, not {forms!r}")
    loaded = _load(model or "smollm2-135m", "none", device, None, None)
    if "fused" in chosen:
        from lmqa.train.fused_attention import supported

        probe = torch.zeros(1, 1, 1, loaded.model.config.head_dim, device=loaded.model.device)
        if not supported(probe, loaded.landmark.block_size):
            raise UserError("--forms fused needs Triton on a CUDA device and a block of 2^n - 1 tokens; "
                            "leave it out (--forms sdpa,tiled)")
    peft_model = add_lora(loaded.model, loaded.landmark.landmark_id, 16, 32)
    rows = []
    for form in chosen:
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
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lmqa.qa.session import KINDS, QAPrompt
    from lmqa.train.finetune import (ResumeError, TrainConfig, add_lora, export_adapter, load_adapter_weights,
                                     plot_losses, process_state, train)
    from lmqa.train.data import ExampleSampler, held_out, load_stream, tokenize_corpus
    from lmqa.train.qa_data import QASampler, read_python_files
    from lmqa.train.book_qa_data import BookQA, split_documents, training_books
    from lmqa.train.real_qa_data import RealQASampler, load_real_qa

    if real_qa_rate and qa_data is None:
        raise UserError("--real-qa-rate needs --qa-data DIR (the folder holding fairytaleqa/ and squad-dev/)")
    if qa_data is not None and not real_qa_rate:
        raise UserError("--qa-data is used only with --real-qa-rate (the share of examples drawn from it)")
    fairytale = squad = None
    if qa_data is not None:
        try:
            fairytale, squad = load_real_qa(qa_data)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--qa-data: {e}") from None
    base = model or "smollm2-135m"
    state = process_state()  # under accelerate launch: selects this process's GPU before the model loads
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
                      attention_tile=attention_tile, attention_form=attention, max_minutes=max_minutes, qa_rate=qa_rate,
                      book_qa_rate=book_qa_rate, real_qa_rate=real_qa_rate)
    if book_qa_rate and not qa_rate:
        raise UserError("--book-qa-rate is a share of the QA examples: give --qa-rate too")
    if attention not in ("auto", "fused", "tiled"):
        raise UserError(f"--attention must be auto, fused or tiled, not {attention!r}")
    code_files = [f for d in code or [] for f in read_python_files(d)]
    if code and not code_files:
        raise UserError(f"no readable .py file under {', '.join(map(str, code))}")
    adapter_file = init_adapter / "adapter_model.safetensors" if init_adapter else None
    if adapter_file and not adapter_file.is_file():
        raise UserError(f"{init_adapter}: no adapter_model.safetensors there")
    output.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:  # every start or resume: what a model card must report
        with open(output / "runs.jsonl", "a") as fh:
            fh.write(json.dumps({"lmqa": __version__, "argv": sys.argv, "data": [str(p) for p in data], "model": base,
                                 "tokens": len(stream), **asdict(cfg), "num_processes": state.num_processes,
                                 "output": str(output),
                                 "code": [str(d) for d in code or []], "code_files": len(code_files),
                                 "qa_data": str(qa_data) if qa_data else None,
                                 "qa_data_questions": {"fairytaleqa": len(fairytale.questions) if fairytale else 0,
                                                       "squad": len(squad.questions) if squad else 0},
                                 "init_adapter": str(init_adapter) if init_adapter else None}, default=str) + "\n")
    torch.manual_seed(seed)  # the LoRA's initial weights too are a function of --seed
    peft_model = add_lora(loaded.model, loaded.landmark.landmark_id, cfg.lora_rank, cfg.lora_alpha)
    if adapter_file:
        try:
            load_adapter_weights(peft_model, adapter_file)
        except ValueError as e:  # another rank, targets or base
            raise UserError(f"--init-adapter: {e}") from None
    sampler = plain = ExampleSampler(stream, tok, cfg.n_ordinary, cfg.synthetic_rate, seed)
    if cfg.qa_rate:
        prompts = {kind: QAPrompt(loaded, kind) for kind in KINDS}
        book_qa = None
        if book_qa_rate:
            books = training_books(split_documents(stream, tok), held_out())
            if not books:
                raise UserError("--book-qa-rate: no book of 20,000 characters or more in the training data")
            book_qa = BookQA(books, lambda text: len(tok(text, add_special_tokens=False).input_ids))
        sampler = QASampler(sampler, prompts, cfg.qa_rate, code_files, book_qa=book_qa, book_rate=book_qa_rate)
    if cfg.real_qa_rate:
        sampler = RealQASampler(sampler, QAPrompt(loaded, "document"), cfg.real_qa_rate, fairytale, squad,
                                book_slice=plain._slice)
    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeRemainingColumn(), console=err, disable=not state.is_main_process)
    with bar:
        task = bar.add_task("train", total=steps, loss="-")
        try:
            losses = train(peft_model, sampler, loaded.landmark.landmark_id, cfg,
                           log=err.print if state.is_main_process else lambda m: None,
                           progress=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.3f}"))
        except ResumeError as e:
            raise UserError(str(e)) from None
    if not state.is_main_process:  # the main process alone writes the adapter, plot and losses
        return
    files = export_adapter(peft_model, output / "adapter",
                           {"base": str(Path(base).resolve()) if Path(base).is_dir() else base,  # any cwd
                            "block_size": cfg.block_size, "top_k": loaded.landmark.top_k, "train_context": context})
    plot_losses(losses, output / "loss.png", f"landmark fine-tuning of {loaded.name}")
    (output / "losses.json").write_text(json.dumps(losses))
    console.print(f"trained {len(losses)} steps, last loss {losses[-1]:.3f}; adapter: {', '.join(str(f) for f in files)}")


# ----- persisted contexts and chat -----
@app.command("ingest")
@friendly
def ingest_command(
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
    from lmqa.qa.context_file import SUFFIX, ContextError
    from lmqa.qa.context_stream import ingest_file, partial_path, resident_bytes
    from lmqa.engine.memory_budget import format_size, parse_budget

    output = output if output.suffix == SUFFIX else output.with_name(output.name + SUFFIX)
    _output_path(output, "--output")
    try:
        piece_bytes = parse_budget(checkpoint_size)
    except ValueError as e:
        raise UserError(f"--checkpoint-size: {e}") from None
    if piece_bytes is None or piece_bytes < 1:
        raise UserError(f"--checkpoint-size must be a size of at least 1 byte, not {checkpoint_size!r}")
    session, allowed = _prepared_session(path, include, exclude, max_memory, model, quantize, device, kv_offload,
                                         None, block_size, _kv_dtype(kv_dtype), keep_boilerplate)
    need = resident_bytes(session, piece_bytes) if session.engine.offload == "cpu" else session.cache_bytes()
    if need > allowed:
        raise _over_budget(session, need, allowed)
    work = partial_path(output)
    interrupted = work.exists()
    if interrupted and not resume:
        err.print(f"[yellow]note:[/yellow] starting over; {escape(str(work))} holds an interrupted ingest "
                  f"(--resume continues it)", soft_wrap=True, highlight=False)
    progress, advance = _prefill_bar(session.positions, "reading")
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
    from lmqa.qa.chat import Chat, ChatConfig, line_reader
    from lmqa.engine.generation import SamplingConfig
    from lmqa.model.loading import CACHE_DIR

    session = _session(path, include, exclude, max_memory, model, quantize, device, kv_offload, top_k, block_size,
                       kv_dtype, keep_boilerplate)
    session.quote = session.quote and quote
    config = ChatConfig(SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                        candidates=candidates), show_blocks, keep,
                        CACHE_DIR / "chat-history")
    Chat(session, config, console, err).run(line_reader(config.history))


import lmqa.serve.command  # noqa: E402,F401  (registers `lmqa serve`; last, as it uses the options above)
