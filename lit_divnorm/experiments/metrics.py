"""The one reader of a run's ``metrics.csv`` (Lightning's CSVLogger): rows, series, the steps
and epochs trained, the test/validation curves.
"""

from __future__ import annotations

import csv
from pathlib import Path


def read_metric_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger ``metrics.csv`` (empty when the file is missing)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def metric_series(rows: list[dict[str, str]], metric: str) -> list[list[float]]:
    """``[[step, value], ...]`` of ``metric`` in file order (rows without it skipped)."""
    series = []
    for row in rows:
        value = row.get(metric)
        if value not in (None, ""):
            series.append([int(float(row.get("step") or 0)), float(value)])
    return series


def training_progress(rows: list[dict[str, str]]) -> tuple[int, int]:
    """(optimizer steps run, epochs begun) from the ``train/*`` rows of ``metrics.csv``.

    Lightning logs a training row at step ``k`` for the ``k + 1``-th step. The per-step rows
    count the steps; the ``*_epoch`` aggregates may carry the step after the last (when a
    callback logged at that step), so they count the steps only in a run without per-step
    rows, and the epochs always.
    """
    step_rows = epoch_rows = epochs = 0
    for row in rows:
        logged = [k for k, v in row.items() if k.startswith("train/") and v not in (None, "")]
        if not logged:
            continue
        step = int(float(row.get("step") or 0)) + 1
        if any(not key.endswith("_epoch") for key in logged):
            step_rows = max(step_rows, step)
        else:
            epoch_rows = max(epoch_rows, step)
        if row.get("epoch") not in (None, ""):
            epochs = max(epochs, int(float(row["epoch"])) + 1)
    return step_rows or epoch_rows, epochs


def curves_of(rows: list[dict[str, str]], metric: str | None) -> dict[str, list[list[float]]]:
    """The ``test/`` and ``val/`` curves of ``metric``'s leaf (``acc`` of ``test/acc``) logged
    in ``rows``, those that have points."""
    if metric is None:
        return {}
    leaf = metric.split("/", 1)[1]
    curves = {name: metric_series(rows, name) for name in (f"test/{leaf}", f"val/{leaf}")}
    return {name: points for name, points in curves.items() if points}


Series = list[tuple[int, float]]


def read_metrics_csv(path: str | Path) -> dict[str, Series]:
    """``metrics.csv`` of Lightning's CSVLogger -> ``{metric: [(step, value), ...]}``
    (:func:`read_metric_rows`; empty cells skipped, rows in file order)."""
    rows = read_metric_rows(Path(path))
    names = dict.fromkeys(key for row in rows for key in row if key not in ("step", "epoch"))
    return {
        name: [(int(step), value) for step, value in metric_series(rows, name)]
        for name in names
        if metric_series(rows, name)
    }


def steps_per_epoch(steps: int, epochs: int) -> int | None:
    """Optimizer steps per epoch of a run that trained ``steps`` over ``epochs`` whole epochs
    (``None`` when they do not divide: a run stopped inside an epoch)."""
    return steps // epochs if epochs and steps % epochs == 0 else None
