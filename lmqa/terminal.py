"""What every command shares on the terminal: stdout for results, stderr for
everything else, one line per expected failure (an output that cannot be
written included), and the progress bar of a prefill. Its own module so that commands registered from elsewhere (`lmqa
serve`) print and fail exactly as cli.py's do without importing cli.py."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lmqa.options import OptionError

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
        except (UserError, ModelError, OptionError) as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)
        except MemoryError:
            err.print("[red]error:[/red] out of memory: try a shorter input, --quantize nf4 or --kv-offload cpu")
            raise typer.Exit(1)

    return wrapper


def check_output_path(path: Optional[Path], flag: str) -> None:
    """Fail before the prefill, not after it, when an output cannot be written."""
    if path is not None and not path.parent.is_dir():
        raise UserError(f"{flag} {path}: directory {path.parent} does not exist")


def write_output(path: Path, write: Callable[[Path], object]) -> None:
    """write(path), an OSError said as one line."""
    try:
        write(path)
    except OSError as e:
        raise UserError(f"{path}: could not write ({e.strerror or e})") from None


def prefill_bar(total: int, label: str):
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
