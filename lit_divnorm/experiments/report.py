"""RESULTS.md: the paper's tables filled only from finished runs, beside the paper's numbers.

    lit-divnorm report                          results/ -> RESULTS.md and results/plots/*.png
    lit-divnorm report --import ../shared/runs  records runs made elsewhere into results/ first
    lit-divnorm report runs/ [more run folders] run folders -> runs/report/report.md and PNGs
        [--results DIR] [--out FILE.md] [--plots DIR | --no-plots]

Sources: the records of :mod:`lit_divnorm.experiments.records` (``--results``; ``results`` by
default when
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
seeds are behind it, the paper's number (:mod:`lit_divnorm.experiments.paper`), ``diff`` = ours -
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
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lit_divnorm.experiments.imports import import_runs
from lit_divnorm.experiments.paper import PAPER_DECORRELATION, PAPER_TABLES, metric_of
from lit_divnorm.experiments.plots import _pyplot, plot_curves, plot_differences
from lit_divnorm.experiments.tables import (
    Cell,
    Result,
    Table,
    _belongs,
    build_table,
    collect_results,
)

DEFAULT_RESULTS = "results"


DEFAULT_OUT = "RESULTS.md"


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
