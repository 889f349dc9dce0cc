"""`lmqa eval`: the needle, passkey and code grids and the bookqa, RULER,
FairytaleQA and SQuAD tasks, each reported on stderr as it runs, saved as
OUT/<task>.json and tabled on stdout (or all of it as one JSON).

Registered on the app by register(), as `lmqa serve` is, so that these
three hundred lines of one command's orchestration are not cli.py's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from lmqa.flags import CandidatesOpt, DeviceOpt, ModelOpt, OffloadOpt, QuantOpt, TopKOpt, integers, options_of
from lmqa.options import EngineOptions, ModelOptions
from lmqa.sessions import load_model, new_engine
from lmqa.terminal import UserError, check_output_path, console, err, friendly, prefill_bar

if TYPE_CHECKING:
    from lmqa.engine.generation import SamplingConfig
    from lmqa.engine.landmark_engine import LandmarkEngine
    from lmqa.model.loading import LoadedModel

OTHER_TASKS = ("code", "bookqa", "ruler", "fairytaleqa", "squad")  # beside the grid tasks of tasks.py


def register(app: typer.Typer) -> None:
    """Add `lmqa eval` to the app."""
    app.command("eval")(friendly(eval_command))


def eval_command(
    ctx: typer.Context,
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
    from lmqa.engine.generation import SamplingConfig
    from lmqa.evaluation.ruler import TASKS as RULER_TASKS
    from lmqa.evaluation.tasks import TASKS, EvalError, parse_depths

    sizes = tuple(integers(lengths, "--lengths", 256, "lengths", "tokens"))
    chosen = tuple(t.strip() for t in tasks.split(",") if t.strip())
    ruler_tasks = RULER_TASKS if "ruler" in chosen else tuple(t for t in chosen if t in RULER_TASKS)
    if not chosen or set(chosen) - set(TASKS) - set(OTHER_TASKS) - set(RULER_TASKS):
        raise UserError(f"--tasks must name some of {', '.join(TASKS)}, code, bookqa, ruler (or its tasks), "
                        f"fairytaleqa, squad, not {tasks!r}")
    check_output_path(out, "--out")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, candidates=candidates)
    try:
        depth_values = parse_depths(depths)
        realqa = RealQA(directory=realqa_dir, split=realqa_split, limit=realqa_limit, filler=realqa_filler,
                        answer=realqa_answer, seed=seed, sampling=sampling) if {"fairytaleqa", "squad"} & set(chosen) else None
    except EvalError as e:
        raise UserError(str(e)) from None
    bookqa = BookQA(directory=bookqa_dir, books=bookqa_books, limit=bookqa_limit) if "bookqa" in chosen else None
    evaluate(options_of(ctx, ModelOptions), options_of(ctx, EngineOptions), sampling, Report(out, as_json),
             lengths=sizes, depths=depth_values, trials=trials, seed=seed, tasks=chosen, ruler_tasks=ruler_tasks,
             max_full=max_full, books=books, baseline_model=baseline_model if baselines else None, bookqa=bookqa,
             realqa=realqa)


@dataclass(frozen=True)
class BookQA:
    """The bookqa task's options: --bookqa-dir, --bookqa-books (comma-separated), --bookqa-limit."""

    directory: Optional[Path]
    books: Optional[str]
    limit: Optional[int]


@dataclass(frozen=True)
class RealQA:
    """The eval options of the fairytaleqa and squad tasks."""

    directory: Optional[Path]
    split: str
    limit: Optional[int]
    filler: int
    answer: str  # comma-separated answer paths
    seed: int
    sampling: SamplingConfig

    def __post_init__(self):
        """Bad options fail here, before the model loads and other tasks run."""
        from lmqa.evaluation.realqa import SPLITS, data_dir
        from lmqa.evaluation.tasks import EvalError

        if self.split not in SPLITS:
            raise EvalError(f"--realqa-split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        data_dir(self.directory)
        self.paths()

    def paths(self):
        """The named answer paths."""
        from lmqa.evaluation.realqa import answer_paths

        return answer_paths([a.strip() for a in self.answer.split(",") if a.strip()], self.sampling)


@dataclass(frozen=True)
class Report:
    """Where each task's results go: OUT/<task>.json, and its table on stdout unless --json."""

    out: Path
    as_json: bool

    def task(self, name: str, data: dict, table: Callable[[], object]) -> dict:
        """Save data as OUT/name (said on stderr) and print table() unless --json; returns data."""
        from lmqa.qa.trace_export import write_json

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / name, data)
        except OSError as e:
            raise UserError(f"{self.out}: could not write the results ({e.strerror or e})") from None
        err.print(f"[dim]wrote {escape(str(self.out / name))}[/dim]", soft_wrap=True)
        if not self.as_json:
            console.print(table())
        return data


def evaluate(model_options: ModelOptions, engine_options: EngineOptions, sampling: SamplingConfig, report: Report, *,
             lengths: tuple[int, ...], depths: tuple[float, ...], trials: int, seed: int, tasks: tuple[str, ...],
             ruler_tasks: tuple[str, ...], max_full: int, books: Optional[Path], baseline_model: Optional[str],
             bookqa: Optional[BookQA], realqa: Optional[RealQA]) -> None:
    """Every chosen task with one model and engine (and the baseline model,
    for the grid tasks); then the grid's table, heatmap and eval.json."""
    from lmqa.evaluation.report import report as grid_report, summarize, table, write_outputs
    from lmqa.evaluation.tasks import TASKS, EvalError, Evaluator, Settings, books_dir, load_needles, read_books

    grid = tuple(t for t in tasks if t in TASKS)  # the tasks with lengths and depths
    try:
        book_texts = read_books(books_dir(books)) if "needle" in tasks or ruler_tasks else []
        loaded = load_model(model_options)
        engine = new_engine(loaded, engine_options)
        base = (load_model(replace(model_options, model=baseline_model, top_k=None))
                if baseline_model is not None and grid not in ((), ("passkey",)) else None)
        window = base.model.config.max_position_embeddings if base is not None else 0
        settings = Settings(lengths, depths, trials, seed, grid, sampling.max_new_tokens, sampling.candidates, max_full,
                            window)
        books_data = _bookqa(loaded, engine, sampling, report, bookqa) if bookqa is not None else None
        ruler_data = _ruler(loaded, engine, report, tasks=ruler_tasks, lengths=lengths, samples=trials, seed=seed,
                            candidates=sampling.candidates, books=book_texts) if ruler_tasks else None
        code_data = _code_eval(loaded, engine, sampling, report) if "code" in tasks else None
        fairytale_data = _fairytaleqa(loaded, engine, realqa, report) if "fairytaleqa" in tasks else None
        squad_data = _squad(loaded, engine, realqa, report) if "squad" in tasks else None
        extra = {"code": code_data, "bookqa": books_data, "ruler": ruler_data, "fairytaleqa": fairytale_data,
                 "squad": squad_data}
        evaluator = Evaluator(loaded, engine, settings, book_texts, load_needles(), base)
        progress, evaluator.progress = prefill_bar(evaluator.positions(), "eval")
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
    extra = {k: v for k, v in extra.items() if v is not None}
    if not grid:
        if report.as_json:
            print(json.dumps(extra, ensure_ascii=False))
        return
    rows = summarize(done)
    title = f"lmqa eval: {loaded.name}, k={loaded.landmark.top_k}, b={loaded.landmark.block_size}, seed {seed}"
    data = grid_report(settings, done, loaded.name, base.name if base is not None else None)
    data.update(extra)
    try:
        paths = write_outputs(report.out, data, rows, title)
    except OSError as e:
        raise UserError(f"{report.out}: could not write the results ({e.strerror or e})") from None
    if report.as_json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        console.print(table(rows, title))
    err.print(f"[dim]wrote {escape(', '.join(map(str, paths.values())))}[/dim]", soft_wrap=True)


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


def _code_eval(loaded: LoadedModel, engine: LandmarkEngine, sampling: SamplingConfig, report: Report) -> dict:
    """`lmqa eval --tasks code`: each source tree of prompts/code_questions.jsonl
    read and asked its questions; OUT/code.json."""
    from lmqa.evaluation import code_eval

    questions = code_eval.load_questions()
    results = []
    said = _said_question("code", lambda r: r.tree, 90)
    for tree in dict.fromkeys(q.tree for q in questions):
        results += code_eval.run_tree(tree, [q for q in questions if q.tree == tree], loaded, engine, sampling,
                                      lambda total: prefill_bar(total, f"reading {tree}"), said)
    data = code_eval.report(results, loaded.name, sampling)
    return report.task("code.json", data, lambda: code_eval.table(
        data["summary"], f"lmqa eval code: {loaded.name}, k={loaded.landmark.top_k}"))


def _bookqa(loaded: LoadedModel, engine: LandmarkEngine, sampling: SamplingConfig, report: Report,
            options: BookQA) -> dict:
    """`lmqa eval --tasks bookqa`: every chosen book read whole (its context
    kept in OUT/contexts, so a rerun skips the prefill) and asked its
    questions; OUT/bookqa.json."""
    from lmqa.evaluation import bookqa
    from lmqa.evaluation.tasks import books_dir

    names = [b.strip() for b in options.books.split(",") if b.strip()] if options.books is not None else None
    questions = bookqa.select(bookqa.load_questions(), names, options.limit)
    folder = books_dir(options.directory, bookqa.BOOKS, "--bookqa-dir")
    runs = []
    said = _said_question("bookqa", lambda r: r.book, 70)
    for book in dict.fromkeys(q.book for q in questions):
        path = folder / book
        if not path.is_file():
            raise UserError(f"{path}: no such book; pass --bookqa-dir DIR")
        runs.append(bookqa.run_book(path, [q for q in questions if q.book == book], loaded, engine,
                                    report.out / "contexts", sampling,
                                    lambda total: prefill_bar(total, f"reading {book}"), said))
    data = bookqa.report(runs, loaded.name, sampling)
    return report.task("bookqa.json", data, lambda: bookqa.table(
        data["summary"], f"lmqa eval bookqa: {loaded.name}, {sampling.candidates} candidates"))


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


def _fairytaleqa(loaded: LoadedModel, engine: LandmarkEngine, options: RealQA, report: Report) -> dict:
    """`lmqa eval --tasks fairytaleqa`: the chosen stories read whole (their
    contexts kept in OUT/contexts) and asked their questions; OUT/fairytaleqa.json."""
    from lmqa.evaluation import realqa

    paths = options.paths()
    questions, stories = realqa.fairytaleqa(realqa.data_dir(options.directory), options.split, options.limit,
                                            options.seed)
    runs = realqa.run_fairytaleqa(questions, stories, loaded, engine, paths, report.out,
                                  lambda total: prefill_bar(total, "reading a story"), _said_realqa("fairytaleqa"))
    settings = {"split": options.split, "limit": options.limit, "seed": options.seed, "answer_paths": list(paths)}
    data = realqa.report(runs, loaded.name, options.sampling, settings)
    return report.task("fairytaleqa.json", data, lambda: realqa.table(
        data["summary"], f"lmqa eval fairytaleqa: {loaded.name}, {options.split} split, seed {options.seed}"))


def _squad(loaded: LoadedModel, engine: LandmarkEngine, options: RealQA, report: Report) -> dict:
    """`lmqa eval --tasks squad`: SQuAD dev v1.1 and v2.0 questions on
    held-out articles, each asked of its paragraph among other paragraphs; OUT/squad.json."""
    from lmqa.evaluation import realqa

    paths = options.paths()
    root = realqa.data_dir(options.directory)
    runs = []
    for version in realqa.SQUAD_VERSIONS:
        dev = realqa.squad(root, version)
        questions = realqa.pick_squad(dev.questions, options.limit, options.seed)
        runs += realqa.run_squad(questions, dev.articles, loaded, engine, paths, options.filler, options.seed,
                                 lambda total: prefill_bar(total, f"reading v{version}"), _said_realqa("squad"))
    settings = {"versions": list(realqa.SQUAD_VERSIONS), "limit": options.limit, "filler_tokens": options.filler,
                "seed": options.seed, "answer_paths": list(paths)}
    data = realqa.report(runs, loaded.name, options.sampling, settings)
    return report.task("squad.json", data, lambda: realqa.table(
        data["summary"], f"lmqa eval squad: {loaded.name}, {options.filler:,} filler tokens, seed {options.seed}"))


def _ruler(loaded: LoadedModel, engine: LandmarkEngine, report: Report, *, tasks: tuple[str, ...],
           lengths: tuple[int, ...], samples: int, seed: int, candidates: int, books: list[str]) -> dict:
    """`lmqa eval --tasks ruler`: RULER's tasks at each length; OUT/ruler.json.
    Stopped by hand, it reports the samples it finished."""
    from lmqa.evaluation import ruler

    evaluator = ruler.RulerEvaluator(loaded, engine, lengths, samples, books, seed, candidates, tasks)
    progress, evaluator.progress = prefill_bar(evaluator.positions(), "ruler")
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
    return report.task("ruler.json", data, lambda: ruler.table(
        done, f"lmqa eval ruler: {loaded.name}, k={loaded.landmark.top_k}, b={loaded.landmark.block_size}, seed {seed}"))
