"""What `lmqa eval` prints and writes: accuracy per task, method and length
(by depth, overall, and how often the evidence held the fact), a lengths x
depths heatmap per task and method, and every trial as JSON. Files are
written whole or not at all (lmqa/atomic_file.py)."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmqa.atomic_file import atomic_path
from .tasks import Settings, Trial
from lmqa.qa.trace_export import write_json

GRID_TASKS = ("needle", "passkey")  # tasks with a length axis, drawn as heatmaps


@dataclass(frozen=True)
class Row:
    """One task, method and length: (correct, total) per requested depth."""

    task: str
    method: str
    length: int
    by_depth: dict[float, tuple[int, int]]
    evidence_hits: int | None  # landmark only

    @property
    def correct(self) -> int:
        return sum(c for c, _ in self.by_depth.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.by_depth.values())

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "method": self.method, "length": self.length, "correct": self.correct,
                "total": self.total, "accuracy": self.correct / self.total,
                "by_depth": {f"{100 * d:g}": {"correct": c, "total": n} for d, (c, n) in self.by_depth.items()},
                "evidence_hit_rate": None if self.evidence_hits is None else self.evidence_hits / self.total}


def summarize(trials: list[Trial]) -> list[Row]:
    groups: dict[tuple[str, str, int], list[Trial]] = defaultdict(list)
    for t in trials:
        groups[(t.task, t.method, t.length)].append(t)
    rows = []
    for (task, method, length), group in groups.items():
        by_depth: dict[float, tuple[int, int]] = {}
        for t in group:
            c, n = by_depth.get(t.depth, (0, 0))
            by_depth[t.depth] = (c + t.correct, n + 1)
        hits = [t.evidence_hit for t in group if t.evidence_hit is not None]
        rows.append(Row(task, method, length, by_depth, sum(hits) if hits else None))
    return rows


def table(rows: list[Row], title: str) -> Table:
    depths = sorted({d for r in rows for d in r.by_depth})
    out = Table(title=title)
    for col in ("task", "method", "tokens", *(f"{100 * d:g}%" for d in depths), "all", "evidence"):
        out.add_column(col, justify="left" if col in ("task", "method") else "right", no_wrap=True,
                       min_width={"task": 7, "method": 9, "tokens": 7}.get(col, len(col)))
    for r in rows:
        cells = [f"{r.by_depth[d][0]}/{r.by_depth[d][1]}" if d in r.by_depth else "" for d in depths]
        evidence = "" if r.evidence_hits is None else f"{100 * r.evidence_hits / r.total:.0f}%"
        out.add_row(r.task, r.method, f"{r.length:,}", *cells, f"{100 * r.correct / r.total:.0f}%",
                    evidence)
    return out


def plot(rows: list[Row], path: Path, title: str) -> None:
    """One panel per task and method with a length axis: accuracy, lengths x depths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        if r.task in GRID_TASKS:
            panels[(r.task, r.method)].append(r)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax, ((task, method), group) in zip(axes[0], panels.items()):
        lengths = sorted({r.length for r in group})
        depths = sorted({d for r in group for d in r.by_depth})
        grid = np.full((len(lengths), len(depths)), np.nan)
        for r in group:
            for d, (c, n) in r.by_depth.items():
                grid[lengths.index(r.length), depths.index(d)] = c / n
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_xlabel("depth")
        ax.set_ylabel("tokens")
        ax.set_title(f"{task}: {method}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def report(settings: Settings, trials: list[Trial], model: str, baseline: str | None) -> dict[str, Any]:
    """The JSON result: settings, the summary rows and every trial."""
    return {"model": model, "baseline_model": baseline, "settings": asdict(settings),
            "summary": [r.to_json() for r in summarize(trials)], "trials": [asdict(t) for t in trials]}


def write_outputs(out: Path, data: dict[str, Any], rows: list[Row], title: str) -> dict[str, Path]:
    """eval.json, eval.txt (the table) and eval.png in out."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "table": out / "eval.txt", "heatmap": out / "eval.png"}
    write_json(paths["json"], data)
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None).print(table(rows, title))
    with atomic_path(paths["table"]) as tmp:
        tmp.write_text(buffer.getvalue())
    plot(rows, paths["heatmap"], title)
    return paths
