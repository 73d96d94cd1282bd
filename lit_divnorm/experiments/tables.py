"""The paper's tables filled from runs: each run a :class:`Result` (a record, or a run folder
that did not finish), each (row, column) a :class:`Cell` (one value per seed of one experiment
identity, the paper's number, notes), each table a :class:`Table`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_divnorm.experiments.configs import normalized_config, schedule_steps
from lit_divnorm.experiments.metrics import (
    curves_of,
    read_metric_rows,
    steps_per_epoch,
    training_progress,
)
from lit_divnorm.experiments.paper import PAPER_TABLES, metric_of
from lit_divnorm.experiments.records import build_record, load_records
from lit_divnorm.runs import (
    DONE_MARKER,
    FAILED_MARKER,
    TESTED_MARKER,
    is_run_folder,
    run_checkpoints,
    run_folders,
)


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
    per_epoch = steps_per_epoch(steps, epochs)
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
