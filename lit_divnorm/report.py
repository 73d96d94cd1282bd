"""RESULTS.md: the paper's tables filled only from finished runs, beside the paper's numbers.

    lit-divnorm report                          results/ -> RESULTS.md and results/plots/*.png
    lit-divnorm report --import ../shared/runs  records runs made elsewhere into results/ first
    lit-divnorm report runs/ [more run folders] run folders -> runs/report/report.md and PNGs
        [--results DIR] [--out FILE.md] [--plots DIR | --no-plots]

Sources: the records of :mod:`lit_divnorm.results` (``--results``; ``results`` by default when
no run folder is given) and run folders, the ``<runs dir>/<area>/<config stem>/<version>/``
of ``lit-divnorm fit`` and ``lit-divnorm sweep`` (``version_<N>``, ``seed<S>_version_<N>`` or a
named version; not the ``test_<N>`` folders of evaluation commands). A finished run folder
(``DONE``) reads as the sweep's record of it; the others are named beside the cells with their
steps but never give a number: ``failed``, ``untested`` (a plain ``fit`` that ran its whole
schedule; its test, if any, logged to another folder) or ``unfinished`` (stopped, or still
running). A run found both as a record and as a folder counts once (the same metrics SHA-256).

Each table (Table 3: CIFAR test accuracy, Table 4: PTB test perplexity, Tables 5-6: SR PSNR and
SSIM; the paper's rows first, then the configs only we ran) has, per column that has runs, one
row per model: ``ours`` = mean +- sample standard deviation over seeds of the final test
metric (one value per seed: that seed's record with the most steps), ``seeds`` = how many
seeds are behind it, the paper's number (:mod:`lit_divnorm.paper_results`), ``diff`` = ours -
paper, and notes: ``partial: S of T steps`` when no run of the cell finished its schedule
(then the partial runs are the cell, marked so), failed or unfinished runs, configs that
differ between the seeds. A cell without runs is empty (``seeds`` 0); nothing is ever 0 for
want of a run. A list of every run behind the tables (seed, steps, device, commit, source)
follows, then Table 10 for analysed run folders.

Plots (PNG, matplotlib): ``diff_<table>.png``, ours - paper per row and column with the seeds'
standard deviation as error bars (hollow markers: partial runs), on an axis around 0 rather
than bars from 0, so that a gap of a few tenths of a point shows; ``curves_<table>_<column>.png``,
the test metric over training steps of every run that logged one during training
(:class:`~lit_divnorm.callbacks.PeriodicTest`, an imported test log), else its validation metric,
with the paper's final number dashed in the same colour.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_divnorm.paper_results import PAPER_DECORRELATION, PAPER_TABLES
from lit_divnorm.results import (
    build_record,
    curves_of,
    import_runs,
    load_records,
    metric_of,
    normalized_config,
    read_metric_rows,
    schedule_steps,
    training_progress,
)
from lit_divnorm.runs import (
    DONE_MARKER,
    FAILED_MARKER,
    TESTED_MARKER,
    is_run_folder,
    run_checkpoints,
    run_folders,
)

Series = list[tuple[int, float]]
DEFAULT_RESULTS = "results"
DEFAULT_OUT = "RESULTS.md"


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


@dataclass
class Result:
    """One run the report knows: a record (``status`` ``"done"``) or a run folder that did
    not finish (``"failed"``, ``"unfinished"``: then ``record`` is ``None``)."""

    experiment: str
    seed: int | None
    status: str
    steps: int
    schedule_steps: int | None
    curves: dict[str, list[list[float]]]
    config: dict[str, Any]
    record: dict[str, Any] | None = None
    log_dir: Path | None = None
    record_file: Path | None = None

    @property
    def area(self) -> str:
        return self.experiment.rsplit("/", 1)[0]

    @property
    def name(self) -> str:
        return self.experiment.rsplit("/", 1)[1]

    @property
    def complete(self) -> bool:
        return bool(self.record and self.record["complete"])

    def value(self, metric: str) -> float | None:
        """The final test ``metric`` of a finished run (``None`` otherwise)."""
        if self.record is None:
            return None
        value = self.record["test_metrics"].get(metric)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _from_record(record: dict[str, Any], path: Path | None, log_dir: Path | None) -> Result:
    return Result(
        experiment=record["experiment"],
        seed=record["seed"],
        status="done",
        steps=int(record["steps"]),
        schedule_steps=record["schedule_steps"],
        curves=record.get("curves") or {},
        config=record.get("config") or {},
        record=record,
        log_dir=log_dir,
        record_file=path,
    )


def _unfinished(log_dir: Path, experiment: str) -> Result:
    """A run folder without ``DONE``: its status (``failed``; ``untested``: a ``fit`` that
    ran its config's whole schedule, tested elsewhere if at all; else ``unfinished``), steps
    and curves from its own files."""
    rows = read_metric_rows(log_dir / "metrics.csv")
    steps, epochs = training_progress(rows)
    config_file = log_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    config = config if isinstance(config, dict) else {}
    per_epoch = steps // epochs if epochs and steps % epochs == 0 else None
    schedule = schedule_steps(config.get("trainer") or {}, per_epoch)
    if (log_dir / FAILED_MARKER).is_file():
        status = "failed"
    elif schedule is not None and steps >= schedule:
        status = "untested"
    else:
        status = "unfinished"
    seed = config.get("seed_everything")
    return Result(
        experiment=experiment,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        status=status,
        steps=steps,
        schedule_steps=schedule,
        curves=curves_of(rows, metric_of(experiment)),
        config=normalized_config(config),
        log_dir=log_dir,
    )


def _started(log_dir: Path) -> bool:
    """Whether a folder without a final marker is a run: it failed (``FAILED``), trained a
    step or holds a checkpoint. The empty folder of a start that failed before its first
    step (a config error) is not a run."""
    if (log_dir / FAILED_MARKER).is_file() or run_checkpoints(log_dir):
        return True
    return training_progress(read_metric_rows(log_dir / "metrics.csv"))[0] > 0


def read_run_folders(runs_dir: str | Path) -> list[Result]:
    """Every run folder under ``runs_dir`` as a :class:`Result` (see the module docstring)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"runs_dir must be an existing folder, got {str(runs_dir)!r}")
    roots = sorted({path.parent for path in runs_dir.rglob("*") if is_run_folder(path)})
    found = []
    for root in roots:
        experiment = root.relative_to(runs_dir).as_posix()
        if "/" not in experiment:
            continue  # a run folder directly below runs_dir names no experiment
        for log_dir in run_folders(root):
            if (log_dir / DONE_MARKER).is_file() or (log_dir / TESTED_MARKER).is_file():
                record = build_record(log_dir, experiment, kind="run folder")
                found.append(_from_record(record, None, log_dir))
            elif _started(log_dir):
                found.append(_unfinished(log_dir, experiment))
    return found


def collect_results(
    results_dir: str | Path | None = None, runs_dirs: Iterable[str | Path] = ()
) -> list[Result]:
    """The records of ``results_dir`` and the run folders of ``runs_dirs``; a run folder
    whose metrics a record already holds is not counted again."""
    results = []
    if results_dir is not None:
        for path, record in load_records(results_dir).items():
            results.append(_from_record(record, path, None))
    known = {r.record["source"]["metrics_sha256"] for r in results if r.record}
    for runs_dir in runs_dirs:
        for result in read_run_folders(runs_dir):
            if result.record is None or result.record["source"]["metrics_sha256"] not in known:
                results.append(result)
    return results


def _belongs(area: str, areas: Iterable[str]) -> bool:
    return any(area == a or (a.endswith("/") and area.startswith(a)) for a in areas)


def column_of(result: Result, table: dict[str, Any]) -> str:
    """The table column a run fills: its area, or ``"<test set> x<scale>"`` for SR.

    An SR run's test figure is that of the checkpoint chosen on its validation set (the
    sweep tests the best ``val/psnr`` checkpoint); a run that validated on its test set
    (``allow_same_val_test``) goes to a column of its own, ``"... (val = test)"``, never
    beside the paper's figure.
    """
    if table["column_from"] == "sr_eval":
        data = (result.config.get("data") or {}).get("init_args") or {}
        if data.get("test_dir") and "scale" in data:
            test = Path(str(data["test_dir"])).name
            same = Path(str(data.get("val_dir"))).name == test
            return f"{test} x{data['scale']}" + (" (val = test)" if same else "")
    return result.area


@dataclass
class Cell:
    """One (row, column) of a table: one value per seed, the paper's number and notes."""

    paper: float | None
    values: dict[int | None, float] = field(default_factory=dict)
    partial: list[tuple[int, int | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    not_ours: bool = False
    results: list[Result] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (``None`` for fewer than two)."""
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None

    @property
    def difference(self) -> float | None:
        """ours - paper; ``None`` for a partial cell (a run stopped before its schedule's end
        is not the paper's experiment) and without runs."""
        if self.mean is None or self.paper is None or self.partial:
            return None
        return self.mean - self.paper


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

    def columns_with_runs(self) -> list[str]:
        return [
            column
            for column in self.columns
            if any(self.cells[(row, column)].results for row in self.rows)
        ]


def fill_cell(cell: Cell, results: list[Result], metric: str) -> Cell:
    """Put ``results`` (runs of one row and column) into ``cell``: per seed the finished run
    with the most steps; the complete runs when any completed its schedule, else the partial
    ones (noted with their steps); unfinished and failed runs of seeds without a finished
    one as notes."""
    cell.results = results
    finished = [r for r in results if r.record is not None and r.value(metric) is not None]
    chosen = [r for r in finished if r.complete] or finished
    chosen = _one_identity(cell, chosen)
    by_seed: dict[int | None, Result] = {}
    for result in chosen:
        best = by_seed.get(result.seed)
        if best is None or result.steps >= best.steps:
            by_seed[result.seed] = result
    cell.values = {seed: r.value(metric) for seed, r in sorted(by_seed.items(), key=_seed_key)}
    if by_seed and not any(r.complete for r in by_seed.values()):
        cell.partial = sorted({(r.steps, r.schedule_steps) for r in by_seed.values()})
        cell.notes.append(
            "partial: "
            + ", ".join(f"{s} of {t if t is not None else '?'} steps" for s, t in cell.partial)
        )
    other = [r for r in results if r.record is None and r.seed not in by_seed]
    for status in ("failed", "untested", "unfinished"):
        runs = [r for r in other if r.status == status]
        if runs:
            steps = ", ".join(f"{r.steps}/{r.schedule_steps or '?'}" for r in runs)
            cell.notes.append(f"{len(runs)} {status} ({steps} steps)")
    done_without = [r for r in results if r.record is not None and r.value(metric) is None]
    if done_without and not cell.values:
        cell.notes.append(f"{len(done_without)} finished without {metric}")
    return cell


def _one_identity(cell: Cell, results: list[Result]) -> list[Result]:
    """The runs of the one experiment identity (``config_sha256``: resolved config, schedule,
    global batch) with the most seeds among ``results`` (then the most runs, then the most
    steps); the others are never averaged in,
    and a note on ``cell`` says how many there are and how they differ."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result.record["config_sha256"], []).append(result)
    if len(groups) < 2:
        return results
    ranked = sorted(
        groups.values(), key=lambda g: (len({r.seed for r in g}), len(g), max(r.steps for r in g))
    )
    kept = ranked[-1]
    for other in ranked[:-1]:
        why = _setting(other[0], kept[0])
        cell.notes.append(f"{len(other)} run(s) of another setting not averaged in ({why})")
    return kept


def _setting(result: Result, kept: Result) -> str:
    """How ``result``'s experiment differs from ``kept``'s: the global batch or schedule
    when those differ, else its identity."""
    batch = (result.record.get("batch") or {}).get("global")
    kept_batch = (kept.record.get("batch") or {}).get("global")
    if batch != kept_batch:
        return f"global batch {batch} against {kept_batch}"
    if result.schedule_steps != kept.schedule_steps:
        return f"schedule {result.schedule_steps} steps against {kept.schedule_steps}"
    return f"config {result.record['config_sha256'][:12]}"


def _seed_key(item: tuple[int | None, Any]) -> tuple[int, int]:
    return (0, item[0]) if item[0] is not None else (1, 0)


def build_table(key: str, results: list[Result]) -> Table:
    """Fill the paper's table ``key`` with ``results`` (a table without runs has empty
    cells: the report still shows it, with "No runs yet")."""
    spec = PAPER_TABLES[key]
    mine = [r for r in results if _belongs(r.area, spec["areas"])]
    rows, columns = dict(spec["rows"]), dict(spec["columns"])
    by_cell: dict[tuple[str, str], list[Result]] = {}
    for result in mine:
        column = column_of(result, spec)
        rows.setdefault(result.name, result.name)
        columns.setdefault(column, column)
        by_cell.setdefault((result.name, column), []).append(result)
    # a row with its own metric but no config (the bicubic baseline) reads that metric from
    # every finished run of the column: every SR run logs the bicubic figure beside its own
    derived = set(spec.get("row_metrics", {})) - {result.name for result in mine}
    cells = {}
    for row in rows:
        metric = spec.get("row_metrics", {}).get(row, spec["metric"])
        for column in columns:
            cell = Cell(spec["values"].get(row, {}).get(column))
            if row in spec["not_ours"]:
                cell.not_ours = True
            elif row in derived:
                runs = [r for (_, c), rs in by_cell.items() if c == column for r in rs]
                fill_cell(cell, [r for r in runs if r.record is not None], metric)
            else:
                fill_cell(cell, by_cell.get((row, column), []), metric)
            cells[(row, column)] = cell
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
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def cell_text(cell: Cell, digits: int) -> str:
    """``mean +- std`` (the mean alone for one seed), ``""`` without runs."""
    if cell.not_ours:
        return "not run (another method)"
    if cell.mean is None:
        return ""
    if cell.std is None:
        return _number(cell.mean, digits)
    return f"{_number(cell.mean, digits)} ± {_number(cell.std, digits)}"


def table_markdown(table: Table) -> str:
    """One Markdown table per column that has runs: model, ours, seeds, paper, diff, notes."""
    better = "higher" if table.higher_is_better else "lower"
    lines = [
        f"## {table.title}",
        "",
        f"Metric `{table.metric}` ({better} is better). ours: mean ± sample std over seeds of "
        "the final test value; seeds: how many seeds are behind it; diff = ours - paper. "
        "An empty cell has no run.",
        "",
    ]
    with_runs = table.columns_with_runs()
    for column in with_runs:
        lines += [
            f"### {table.columns[column]}",
            "",
            "| Model | ours | seeds | paper | diff | notes |",
            "|---|---|---|---|---|---|",
        ]
        for row, label in table.rows.items():
            cell = table.cells[(row, column)]
            parts = [
                label,
                cell_text(cell, table.digits),
                "" if cell.not_ours else str(cell.seeds),
                _number(cell.paper, table.digits),
                _number(cell.difference, table.digits, signed=True),
                "; ".join(cell.notes),
            ]
            lines.append("| " + " | ".join(parts) + " |")
        lines.append("")
    without = [label for column, label in table.columns.items() if column not in with_runs]
    if without:
        lines.append(f"No runs yet: {', '.join(without)}.")
        lines.append("")
    return "\n".join(lines)


def _where(result: Result, base: Path) -> str:
    if result.record_file is not None and result.record is not None:
        source = result.record["source"]
        link = _link(result.record_file, base)
        return f"{source['kind']} of `{source['run_dir']}`: [{result.record_file.name}]({link})"
    return f"run folder `{result.log_dir}`"


def _command(record: dict[str, Any]) -> str:
    """The record's re-runnable command (machine paths as ``$CIFAR10_DIR``-style variables),
    for a table cell; ``—`` for none."""
    command = record.get("command")
    return f"`{command.replace('|', '/')}`" if command else "—"


def _commits(record: dict[str, Any]) -> str:
    """The commit of a run, or of each part of a run made in parts (``a + b (2 parts)``)."""
    parts = (record.get("source") or {}).get("parts") or []
    if len(parts) > 1:
        shown = " + ".join(str(part["git_commit"] or "?")[:10] for part in parts)
        return f"{shown} ({len(parts)} parts)"
    commit = (record.get("git_commit") or "")[:10]
    return (commit + (" (dirty)" if record.get("git_dirty") else "")) or "—"


def runs_markdown(results: list[Result], base: Path) -> str:
    """Every run the report read, one line each: what it measured and where it came from
    (record files linked relative to ``base``, the report's folder)."""
    if not results:
        return ""
    lines = [
        "## Runs",
        "",
        "Every run behind the tables: its final test metric, the steps it ran of its config's "
        "schedule, where it ran, from which code, the command that re-runs it (set the "
        "`$..._DIR` variables to your data folders), and its record.",
        "",
        "| Experiment | Seed | Status | Test metric | Steps | Device | Commit | Command | Source |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in sorted(results, key=lambda r: (r.experiment, str(r.seed), r.steps)):
        metric = metric_of(result.experiment)
        value = result.value(metric) if metric else None
        if value is None and result.record is not None:
            tests = result.record["test_metrics"]
            figure = ", ".join(f"{k} {v:.4g}" for k, v in sorted(tests.items())) or "—"
        else:
            figure = "—" if value is None else f"{metric} {value:.6g}"
        steps = f"{result.steps} of {result.schedule_steps or '?'}"
        record = result.record or {}
        status = result.status
        if result.record is not None:
            status = "complete" if result.complete else "partial"
        lines.append(
            f"| {result.experiment} | {'—' if result.seed is None else result.seed} | {status} "
            f"| {figure} | {steps} | {record.get('device') or '—'} | "
            f"{_commits(record) if record else '—'} | {_command(record)} | "
            f"{_where(result, base)} |"
        )
    return "\n".join(lines) + "\n"


def other_runs_markdown(results: list[Result]) -> str:
    """Runs that belong to none of the paper's tables: final test metrics or status."""
    tables = PAPER_TABLES.values()
    others = [r for r in results if not any(_belongs(r.area, t["areas"]) for t in tables)]
    if not others:
        return ""
    lines = [
        "## Other runs (no paper figure)",
        "",
        "| Run | Seed | Status | Final metrics |",
        "|---|---|---|---|",
    ]
    for result in others:
        tests = (result.record or {}).get("test_metrics", {})
        text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(tests.items())) or "—"
        lines.append(f"| {result.experiment} | {result.seed} | {result.status} | {text} |")
    return "\n".join(lines) + "\n"


def decorrelation_markdown(results: list[Result]) -> str:
    """Table 10 (first-layer mean |correlation| and MI, nats) for run folders analysed with
    ``lit-divnorm analyze`` (``<run>/analysis/analysis.json``), beside the paper's figures."""
    found = []
    for result in results:
        path = result.log_dir / "analysis" / "analysis.json" if result.log_dir else None
        if path is not None and path.is_file():
            found.append((result, json.loads(path.read_text())))
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
    for result, figures in found:
        paper = PAPER_DECORRELATION.get(result.name) if result.area == "cifar10" else None
        lines.append(
            f"| {result.experiment} | {figures['mean_abs_correlation']:.4f} | "
            f"{_number(paper and paper[0], 4) or '—'} | "
            f"{figures['mean_mutual_information_nats']:.4f} | "
            f"{_number(paper and paper[1], 4) or '—'} |"
        )
    return "\n".join(lines) + "\n"


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


def plot_differences(table: Table, path: str | Path) -> Path | None:
    """Ours - paper per row (one panel per column with runs), the seeds' standard deviation
    as error bars, hollow markers for partial runs, a line at 0; ``None`` if nothing to
    plot (no cell with both a run and a paper number)."""
    panels = []
    for column in table.columns_with_runs():
        rows = [row for row in table.rows if table.cells[(row, column)].difference is not None]
        if rows:
            panels.append((column, rows))
    if not panels:
        return None
    plt = _pyplot()
    height = max(3.0, 0.45 * max(len(rows) for _, rows in panels) + 1.5)
    size = (max(8, 6 * len(panels)), height)
    figure, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for axis, (column, rows) in zip(axes[0], panels):
        reach = 0.0
        for position, row in enumerate(rows):
            cell = table.cells[(row, column)]
            error = cell.std or 0.0
            reach = max(reach, abs(cell.difference) + error)
            axis.errorbar(
                cell.difference,
                position,
                xerr=error if cell.std is not None else None,
                fmt="o",
                color="C0",
                markerfacecolor="white" if cell.partial else "C0",
                capsize=4,
            )
            note = f"n={cell.seeds}" + (", partial" if cell.partial else "")
            axis.annotate(
                note,
                (cell.difference, position),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize="small",
            )
        axis.axvline(0.0, color="black", linewidth=1)
        reach = reach * 1.4 or 1.0
        axis.set_xlim(-reach, reach)
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels([table.rows[row] for row in rows])
        axis.set_ylim(-0.7, len(rows) - 0.3)
        axis.invert_yaxis()
        better = "higher" if table.higher_is_better else "lower"
        axis.set_xlabel(f"ours - paper ({table.metric}; {better} is better)")
        axis.set_title(table.columns[column])
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"{table.title}: ours - paper, error bars: std over seeds")
    return save_figure(figure, path)


def plot_curves(table: Table, column: str, path: str | Path) -> Path | None:
    """The runs of ``column`` over training: left, the test metric (the points a
    :class:`~lit_divnorm.callbacks.PeriodicTest` logged and each finished run's final test, a
    star) beside the paper's test number of its row, dashed in the same colour; right, when
    runs logged one, the validation metric, which is not the paper's figure and has no paper
    line. ``None`` if no run of the column has a test or validation figure."""
    leaf = table.metric.split("/", 1)[1]
    runs = [(row, r) for row in table.rows for r in table.cells[(row, column)].results]
    tested = [(row, r) for row, r in runs if r.curves.get(f"test/{leaf}") or _final(r, table)]
    validated = [(row, r) for row, r in runs if r.curves.get(f"val/{leaf}")]
    if not tested and not validated:
        return None
    plt = _pyplot()
    panels = [("test", tested)] + ([("validation", validated)] if validated else [])
    figure, axes = plt.subplots(
        1, len(panels), figsize=(8 * len(panels), 5), squeeze=False, sharex=True
    )
    colours: dict[str, str] = {}
    for axis, (kind, members) in zip(axes[0], panels):
        for row, result in members:
            colour = colours.setdefault(row, f"C{len(colours) % 10}")
            label = _curve_label(table, row, result)
            points = result.curves.get(f"{'test' if kind == 'test' else 'val'}/{leaf}") or []
            if points:
                steps, values = zip(*points)
                marker = "o" if len(steps) < 30 else None
                axis.plot(steps, values, color=colour, marker=marker, markersize=3, label=label)
                label = None
            final = _final(result, table) if kind == "test" else None
            if final is not None:
                axis.plot([result.steps], [final], "*", color=colour, markersize=12, label=label)
        if kind == "test":
            for row in {row for row, _ in members}:
                paper = table.cells[(row, column)].paper
                if paper is not None:
                    axis.axhline(
                        paper,
                        color=colours[row],
                        linestyle="--",
                        linewidth=1,
                        label=f"{table.rows[row]}: paper (test) {paper}",
                    )
        axis.set_xlabel("training step")
        axis.set_ylabel(f"{'test' if kind == 'test' else 'val'}/{leaf}")
        axis.set_title(
            f"{table.columns[column]}: {kind}"
            + (" (star: final test)" if kind == "test" else " (no paper figure)")
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"{table.title}, {table.columns[column]}: over training")
    return save_figure(figure, path)


def _final(result: Result, table: Table) -> float | None:
    return result.value(table.metric)


def _curve_label(table: Table, row: str, result: Result) -> str:
    seed = "" if result.seed is None else f" seed {result.seed}"
    state = "" if result.complete else f" ({result.status if not result.record else 'partial'})"
    return f"{table.rows[row]}{seed}{state}"


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _run_counts(results: list[Result]) -> str:
    """``"2 complete, 1 partial, 0 failed, 0 unfinished run(s)"``: a partial run is a finished
    and tested run that stopped before its schedule's end."""
    complete = sum(r.record is not None and r.complete for r in results)
    partial = sum(r.record is not None and not r.complete for r in results)
    failed = sum(r.status == "failed" for r in results)
    other = len(results) - complete - partial - failed
    return f"{complete} complete, {partial} partial, {failed} failed, {other} unfinished run(s)"


def write_report(
    results_dir: str | Path | None = None,
    runs_dirs: Iterable[str | Path] = (),
    out: str | Path = DEFAULT_OUT,
    plots_dir: str | Path | None = None,
    plots: bool = True,
) -> Path:
    """Write the Markdown report ``out`` (and the PNG plots into ``plots_dir``, default
    ``out``'s folder) from the records of ``results_dir`` and the run folders of
    ``runs_dirs``; returns ``out``."""
    runs_dirs = list(runs_dirs)
    if results_dir is None and not runs_dirs:
        raise ValueError("nothing to report: give a results folder or run folders")
    results = collect_results(results_dir, runs_dirs)
    if plots:
        _pyplot()  # fail before writing anything when matplotlib is missing
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots_dir = Path(plots_dir) if plots_dir is not None else out.parent
    sources = [f"`{results_dir}` (records)"] if results_dir is not None else []
    sources += [f"`{folder}` (run folders)" for folder in runs_dirs]
    sections = [
        "# Results beside the paper\n\n"
        f"Generated by `lit-divnorm report` from {' and '.join(sources)}: "
        f"{_run_counts(results)}. Every number below is read from a run's own files; see the "
        "list of runs at the end.\n"
    ]
    figures: list[Path] = []
    for key in PAPER_TABLES:
        table = build_table(key, results)
        sections.append(table_markdown(table))
        if not plots:
            continue
        plots_dir.mkdir(parents=True, exist_ok=True)
        if (chart := plot_differences(table, plots_dir / f"diff_{key}.png")) is not None:
            figures.append(chart)
        for column in table.columns_with_runs():
            name = re.sub(r"[^a-z0-9-]+", "_", table.columns[column].lower()).strip("_")
            curve = plot_curves(table, column, plots_dir / f"curves_{key}_{name}.png")
            if curve is not None:
                figures.append(curve)
    if figures:
        sections.append(
            "## Plots\n\n"
            + "\n".join(f"![{p.stem}]({_link(p, out.parent)})" for p in figures)
            + "\n"
        )
    sections.append(runs_markdown(results, out.parent))
    sections.append(other_runs_markdown(results))
    sections.append(decorrelation_markdown(results))
    out.write_text("\n".join(s for s in sections if s))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="lit-divnorm report",
        description="RESULTS.md: the paper's tables from finished runs, beside the paper's "
        "numbers, with PNG plots.",
    )
    parser.add_argument("runs_dirs", nargs="*", help="run folders to read (runs/ ...)")
    parser.add_argument(
        "--results",
        help="folder of run records (default: results, when no run folder is given)",
    )
    parser.add_argument(
        "--import",
        dest="import_dir",
        metavar="FOLDER",
        help="first record the runs of FOLDER (<run>/RUN.md, the ../shared/runs format)",
    )
    parser.add_argument(
        "--out",
        help="Markdown file (default RESULTS.md; RUNS_DIR/report/report.md for run folders)",
    )
    parser.add_argument(
        "--plots",
        help="folder of the PNG plots (default: results/plots for RESULTS.md, else beside "
        "the Markdown file)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results_dir = options.results
    if results_dir is None and (not options.runs_dirs or options.import_dir):
        results_dir = DEFAULT_RESULTS
    if options.out is not None:
        out = Path(options.out)
    elif options.runs_dirs:
        out = Path(options.runs_dirs[0]) / "report" / "report.md"
    else:
        out = Path(DEFAULT_OUT)
    plots_dir = options.plots
    if plots_dir is None and options.out is None and not options.runs_dirs:
        plots_dir = Path(results_dir) / "plots"
    try:
        if options.import_dir:
            for path in import_runs(options.import_dir, results_dir):
                print(f"[report] recorded {path}")
        report = write_report(
            results_dir, options.runs_dirs, out, plots_dir, plots=not options.no_plots
        )
    except ValueError as error:
        parser.error(str(error))
    print(f"[report] wrote {report}")
    return report


if __name__ == "__main__":
    main()
