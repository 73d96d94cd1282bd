"""Read a sweep's runs and write the paper's tables with our numbers beside the paper's.

    lit-divnorm report runs/ [--out runs/report]

Writes ``report.md`` (Table 3: model x dataset test accuracy, Table 4: model x cell test
perplexity, Tables 5-6: PSNR / SSIM; each cell ours | paper | ours - paper, plus a table of our
runs the paper has no number for) and PNG plots: ``curves_<area>.png`` (the validation metric of
every normalizer of one experiment over training steps; the training metric when a task has no
validation loop, as the paper's CIFAR setting) and ``bars_<table>.png`` (final metrics, ours
against the paper's).

Runs are the ``<runs dir>/<area>/<config stem>/<version>/`` folders that ``lit-divnorm fit``
and :mod:`lit_divnorm.sweep` write (``version_<N>`` or a named version such as a SLURM job
name; not the ``test_<N>`` folders of evaluation commands, see :mod:`lit_divnorm.runs`); each
config uses its most recently written version with a ``DONE`` marker, else its most recently
written version, shown as ``failed`` or ``unfinished``. Only CSV logs (``metrics.csv``) are read.
A cell with no run reads ``missing``, never 0. The paper's numbers come from
:mod:`lit_divnorm.paper_results`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_divnorm.paper_results import PAPER_DECORRELATION, PAPER_TABLES
from lit_divnorm.runs import is_run_folder, run_folders
from lit_divnorm.sweep import DONE_MARKER, FAILED_MARKER

Series = list[tuple[int, float]]


@dataclass
class Run:
    """The chosen version of one config's runs.

    ``status``: ``"done"``, ``"failed"`` or ``"unfinished"``; ``metrics``: every logged
    metric as ``[(step, value), ...]`` in file order; ``config``: the run's saved config.
    """

    area: str
    name: str
    log_dir: Path
    status: str
    metrics: dict[str, Series] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    def final(self, metric: str) -> float | None:
        """The last logged value of ``metric``, or ``None`` if it was never logged."""
        series = self.metrics.get(metric)
        return series[-1][1] if series else None


def read_metrics_csv(path: str | Path) -> dict[str, Series]:
    """``metrics.csv`` of Lightning's CSVLogger -> ``{metric: [(step, value), ...]}``.

    Empty cells (a metric not logged on that row) are skipped; rows keep file order.
    """
    path = Path(path)
    metrics: dict[str, Series] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                metrics.setdefault(key, []).append((step, float(value)))
    return metrics


def load_run(log_dir: Path, area: str, name: str) -> Run:
    if (log_dir / DONE_MARKER).is_file():
        status = "done"
    elif (log_dir / FAILED_MARKER).is_file():
        status = "failed"
    else:
        status = "unfinished"
    metrics_file = log_dir / "metrics.csv"
    metrics = read_metrics_csv(metrics_file) if metrics_file.is_file() else {}
    config_file = log_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    return Run(area, name, log_dir, status, metrics, config)


def collect_runs(runs_dir: str | Path) -> list[Run]:
    """One :class:`Run` per config found under ``runs_dir`` (see the module docstring)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"runs_dir must be an existing folder, got {str(runs_dir)!r}")
    roots = sorted({path.parent for path in runs_dir.rglob("*") if is_run_folder(path)})
    runs = []
    for root in roots:
        found = run_folders(root)
        if not found:
            continue
        done = [v for v in found if (v / DONE_MARKER).is_file()]
        chosen = done[-1] if done else found[-1]
        area = root.parent.relative_to(runs_dir).as_posix()
        runs.append(load_run(chosen, area, root.name))
    return runs


def _belongs(area: str, areas: Iterable[str]) -> bool:
    return any(area == a or (a.endswith("/") and area.startswith(a)) for a in areas)


def column_of(run: Run, table: dict[str, Any]) -> str:
    """The table column a run fills: its area, or ``"<test set> x<scale>"`` for SR.

    An SR run's test figure is that of the checkpoint chosen on its validation set (the
    sweep tests the best ``val/psnr`` checkpoint); a run that validated on its test set
    (``allow_same_val_test``) goes to a column of its own, ``"... (val = test)"``, never
    beside the paper's figure.
    """
    if table["column_from"] == "sr_eval":
        data = ((run.config or {}).get("data") or {}).get("init_args") or {}
        if "test_dir" in data and "scale" in data:
            test = Path(str(data["test_dir"])).name
            same = Path(str(data.get("val_dir"))).name == test
            return f"{test} x{data['scale']}" + (" (val = test)" if same else "")
    return run.area


@dataclass
class Cell:
    ours: float | None
    paper: float | None
    status: str  # "done", "failed", "unfinished", "missing", "not run", "no metric"

    @property
    def difference(self) -> float | None:
        if self.ours is None or self.paper is None:
            return None
        return self.ours - self.paper


@dataclass
class Table:
    key: str
    title: str
    metric: str
    digits: int
    rows: dict[str, str]
    columns: dict[str, str]
    cells: dict[tuple[str, str], Cell]
    higher_is_better: bool


def build_table(key: str, runs: list[Run]) -> Table | None:
    """Fill the paper's table ``key`` with ``runs``; ``None`` if no run belongs to it.

    Rows/columns of the paper come first, then rows/columns only we ran (paper: none).
    """
    spec = PAPER_TABLES[key]
    mine = [run for run in runs if _belongs(run.area, spec["areas"])]
    if not mine:
        return None
    rows, columns = dict(spec["rows"]), dict(spec["columns"])
    by_cell: dict[tuple[str, str], Run] = {}
    for run in mine:
        column = column_of(run, spec)
        rows.setdefault(run.name, run.name)
        columns.setdefault(column, column)
        by_cell[(run.name, column)] = run
    # a row with its own metric but no config (the bicubic baseline) reads that metric from
    # any finished run of the column: every SR run logs the bicubic figure beside its own
    derived_rows = set(spec.get("row_metrics", {})) - {run.name for run in mine}
    cells = {}
    for row in rows:
        metric = spec.get("row_metrics", {}).get(row, spec["metric"])
        for column in columns:
            paper = spec["values"].get(row, {}).get(column)
            run = by_cell.get((row, column))
            if run is None and row in derived_rows:
                done = [r for (_, c), r in sorted(by_cell.items()) if c == column]
                done = [r for r in done if r.status == "done"]
                run = done[0] if done else None
            if row in spec["not_ours"]:
                cells[(row, column)] = Cell(None, paper, "not run")
            elif run is None:
                cells[(row, column)] = Cell(None, paper, "missing")
            elif run.status != "done":
                cells[(row, column)] = Cell(None, paper, run.status)
            else:
                value = run.final(metric)
                cells[(row, column)] = Cell(
                    value, paper, "done" if value is not None else "no metric"
                )
    return Table(
        key,
        spec["title"],
        spec["metric"],
        spec["digits"],
        rows,
        columns,
        cells,
        spec["higher_is_better"],
    )


def _number(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def table_markdown(table: Table) -> str:
    """The table as Markdown: one row per model, ``ours | paper | diff`` per column."""
    better = "higher" if table.higher_is_better else "lower"
    lines = [
        f"## {table.title}",
        "",
        f"Metric `{table.metric}` ({better} is better); diff = ours - paper.",
        "",
    ]
    header = ["Model"]
    for label in table.columns.values():
        header += [f"{label} ours", f"{label} paper", f"{label} diff"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row, label in table.rows.items():
        parts = [label]
        for column in table.columns:
            cell = table.cells[(row, column)]
            ours = _number(cell.ours, table.digits) if cell.status == "done" else cell.status
            parts += [
                ours,
                _number(cell.paper, table.digits),
                _number(cell.difference, table.digits, signed=True),
            ]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def other_runs_markdown(runs: list[Run]) -> str:
    """Runs that belong to none of the paper's tables: final test/val metrics."""
    tables = PAPER_TABLES.values()
    others = [r for r in runs if not any(_belongs(r.area, t["areas"]) for t in tables)]
    if not others:
        return ""
    lines = [
        "## Other runs (no paper figure)",
        "",
        "| Run | Status | Final metrics |",
        "|---|---|---|",
    ]
    for run in others:
        finals = {
            key: run.final(key) for key in sorted(run.metrics) if key.startswith(("test/", "val/"))
        }
        text = ", ".join(f"{k} {v:.4g}" for k, v in finals.items()) or "—"
        lines.append(f"| {run.area}/{run.name} | {run.status} | {text} |")
    return "\n".join(lines) + "\n"


def decorrelation_markdown(runs: list[Run]) -> str:
    """Table 10 (first-layer mean |correlation| and MI, nats) for runs analysed with
    ``lit-divnorm analyze`` (``<run>/analysis/analysis.json``), beside the paper's figures."""
    found = []
    for run in runs:
        path = run.log_dir / "analysis" / "analysis.json"
        if path.is_file():
            found.append((run, json.loads(path.read_text())))
    if not found:
        return ""
    lines = [
        "## Table 10: decorrelation of first-layer responses",
        "",
        "Mean |correlation| over channel pairs and mean histogram MI (nats); see "
        "`lit_divnorm.analysis` for the exact estimators.",
        "",
        "| Run | corr ours | corr paper | MI ours | MI paper |",
        "|---|---|---|---|---|",
    ]
    for run, result in found:
        paper = PAPER_DECORRELATION.get(run.name) if run.area == "cifar10" else None
        lines.append(
            f"| {run.area}/{run.name} | {result['mean_abs_correlation']:.4f} | "
            f"{_number(paper and paper[0], 4)} | "
            f"{result['mean_mutual_information_nats']:.4f} | {_number(paper and paper[1], 4)} |"
        )
    return "\n".join(lines) + "\n"


def curve_metric(runs: list[Run], metric: str) -> str | None:
    """What to plot for ``metric`` (e.g. ``test/acc``): its ``val/`` form if any run logged
    it, else the training form (``train/acc_epoch``, ``train/acc_step``, ``train/acc``)."""
    leaf = metric.split("/", 1)[1]
    candidates = [f"val/{leaf}", f"train/{leaf}_epoch", f"train/{leaf}_step", f"train/{leaf}"]
    candidates += ["val/loss", "train/loss_epoch", "train/loss_step", "train/loss"]
    for candidate in candidates:
        if any(run.metrics.get(candidate) for run in runs):
            return candidate
    return None


def save_figure(figure, path: str | Path) -> Path:
    """Lay out, write as PNG and close a matplotlib figure; returns ``path``."""
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    return Path(path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'lit-divnorm[plot]' (or pip install matplotlib);"
            " lit-divnorm report --no-plots writes the tables alone"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[Run], metric: str, title: str, path: str | Path) -> Path | None:
    """One chart: ``metric``'s curve (see :func:`curve_metric`) of every run over steps."""
    shown = curve_metric(runs, metric)
    if shown is None:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for run in sorted(runs, key=lambda r: r.name):
        series = run.metrics.get(shown)
        if series:
            steps, values = zip(*series)
            axis.plot(steps, values, marker="o" if len(series) < 20 else None, label=run.name)
    axis.set_xlabel("training step")
    axis.set_ylabel(shown)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", ncol=2)
    return save_figure(figure, path)


def plot_bars(table: Table, path: str | Path) -> Path | None:
    """Grouped bars per column of ``table``: ours beside the paper's, for every row we ran."""
    columns = [
        c for c in table.columns if any(table.cells[(r, c)].ours is not None for r in table.rows)
    ]
    if not columns:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(
        1, len(columns), figsize=(max(6, 5 * len(columns)), 5), squeeze=False
    )
    for axis, column in zip(axes[0], columns):
        rows = [r for r in table.rows if table.cells[(r, column)].ours is not None]
        positions = range(len(rows))
        ours = [table.cells[(r, column)].ours for r in rows]
        paper = [table.cells[(r, column)].paper for r in rows]
        axis.bar([p - 0.2 for p in positions], ours, width=0.4, label="ours")
        paper_values = [math.nan if v is None else v for v in paper]
        axis.bar([p + 0.2 for p in positions], paper_values, width=0.4, label="paper")
        axis.set_xticks(list(positions))
        axis.set_xticklabels([table.rows[r] for r in rows], rotation=45, ha="right")
        axis.set_title(table.columns[column])
        axis.set_ylabel(table.metric)
        top = max(v for v in [*ours, *paper] if v is not None)
        axis.set_ylim(0, top * 1.2)  # room for the legend above the bars
        axis.legend(fontsize="small", loc="upper right", ncol=2)
    figure.suptitle(table.title)
    return save_figure(figure, path)


def write_report(runs_dir: str | Path, out: str | Path | None = None, plots: bool = True) -> Path:
    """Write ``report.md`` and the plots into ``out`` (default ``<runs_dir>/report``)."""
    runs = collect_runs(runs_dir)
    if plots:
        _pyplot()  # fail before writing anything when matplotlib is missing
    out = Path(out) if out is not None else Path(runs_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"# Results beside the paper\n\nRuns read from `{runs_dir}`: {len(runs)}.\n"]
    figures: list[Path] = []
    for key in PAPER_TABLES:
        table = build_table(key, runs)
        if table is None:
            continue
        sections.append(table_markdown(table))
        if plots and (bars := plot_bars(table, out / f"bars_{key}.png")) is not None:
            figures.append(bars)
    sections.append(other_runs_markdown(runs))
    sections.append(decorrelation_markdown(runs))
    if plots:
        for area in sorted({run.area for run in runs}):
            area_runs = [run for run in runs if run.area == area]
            spec = next((t for t in PAPER_TABLES.values() if _belongs(area, t["areas"])), None)
            metric = spec["metric"] if spec else "val/loss"
            name = area.replace("/", "_")
            curve = plot_curves(
                area_runs, metric, f"{area}: every normalizer", out / f"curves_{name}.png"
            )
            if curve is not None:
                figures.append(curve)
    if figures:
        sections.append(
            "## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
        )
    report = out / "report.md"
    report.write_text("\n".join(s for s in sections if s))
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="lit-divnorm report",
        description="Paper-style Markdown tables (ours beside the paper's) and PNG plots.",
    )
    parser.add_argument("runs_dir", help="the sweep's runs folder")
    parser.add_argument("--out", help="output folder (default RUNS_DIR/report)")
    parser.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = write_report(options.runs_dir, options.out, plots=not options.no_plots)
    except ValueError as error:
        parser.error(str(error))
    print(f"[report] wrote {report}")
    return report


if __name__ == "__main__":
    main()
