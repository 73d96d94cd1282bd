"""One small JSON per finished run: what ran, where, from which code, and what it measured.

    results/<area>/<config stem>/seed<S>_<run id>.json

:mod:`lit_divnorm.experiments.sweep` writes one when a run ends (:func:`build_record` of its run
folder,
then :func:`write_record`); ``lit-divnorm report --import FOLDER`` turns runs made elsewhere
(folders in the ``../shared/runs`` format, :func:`import_run`) into the same records;
:mod:`lit_divnorm.experiments.report` builds ``RESULTS.md`` from them alone. Every number in a
record is
read from the run's own files (``metrics.csv``, ``config.yaml``, the sweep's ``DONE`` summary,
an imported run's ``test_metrics.csv`` and test log), never typed in.

Fields of a record (:data:`RECORD_FIELDS`):
    experiment: ``"<area>/<config stem>"`` (``"cifar10/dn_star"``); seed: the run's
    ``seed_everything``; metric / value: the paper's metric for the experiment
    (:mod:`lit_divnorm.experiments.paper`) and the run's final test value (``None`` when the
    experiment has no paper table); test_metrics: every final ``test/*`` number;
    steps: optimizer steps run; schedule_steps: the steps of the experiment config's own
    schedule (``max_steps``, or ``max_epochs`` x batches per epoch); complete:
    ``steps >= schedule_steps``; wall_time_s; device; threads; versions (python, torch,
    lightning, ...); git_commit / git_dirty; config_sha256 of ``config`` (the run's resolved
    config less what says where and how it ran, :func:`normalized_config`); command and
    overrides; curves: ``{metric: [[step, value], ...]}`` of the ``test/`` and ``val/``
    metric logged during training (a run with :class:`~lit_divnorm.callbacks.PeriodicTest`
    has a test curve); source: how the record was made (``kind`` ``"sweep"``, ``"run folder"``
    or ``"import"``, the run folder, the SHA-256 of its metrics files, and for an import the
    provenance its ``RUN.md`` gives).

The run id is the start of the SHA-256 of the run's metrics files, so writing the record of the
same run twice (a re-import) replaces its file and two runs never share one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lit_divnorm.checkpoint import atomic_write_text
from lit_divnorm.experiments.configs import (
    batch_facts,
    config_hash,
    normalized_config,
    repository_path,
    resolved_config,
    schedule_steps,
)
from lit_divnorm.experiments.metrics import (
    curves_of,
    read_metric_rows,
    steps_per_epoch,
    training_progress,
)
from lit_divnorm.experiments.paper import metric_of
from lit_divnorm.runs import DONE_MARKER, TESTED_MARKER

_PLACEHOLDER = re.compile(r"<[^<>]*>")
SCHEMA = 2


@dataclass
class Record:
    """One finished run, as its JSON file holds it (the fields: see the module docstring);
    ``complete`` is derived (``steps >= schedule_steps``). :meth:`as_dict` is the JSON."""

    experiment: str
    seed: int | None
    metric: str | None
    value: float | None
    test_metrics: dict[str, float]
    steps: int
    schedule_steps: int | None
    wall_time_s: float | None
    device: str | None
    threads: int | None
    versions: dict[str, str | None]
    git_commit: str | None
    git_dirty: bool | None
    config_sha256: str
    config: dict[str, Any]
    batch: dict[str, Any]
    command: str | None
    overrides: list[str]
    curves: dict[str, list[list[float]]]
    source: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.schedule_steps is not None and self.steps >= self.schedule_steps

    def as_dict(self) -> dict[str, Any]:
        """The record in :data:`RECORD_FIELDS` order, with ``schema`` and ``complete``."""
        values = {"schema": SCHEMA, **asdict(self), "complete": self.complete}
        return {name: values[name] for name in RECORD_FIELDS}


_NAMES = [field_.name for field_ in fields(Record)]
# the JSON's order: "complete" right after the steps and schedule it is derived from
RECORD_FIELDS = ("schema", *_NAMES[:7], "complete", *_NAMES[7:])


def file_sha256(*paths: Path) -> str:
    """SHA-256 over the bytes of ``paths`` in order (those that exist)."""
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def build_record(
    log_dir: str | Path, experiment: str | None = None, kind: str = "sweep"
) -> dict[str, Any]:
    """The record of a finished run from its folder: the ``DONE`` summary that
    :func:`lit_divnorm.experiments.sweep.run_one` wrote (else the ``TESTED`` summary that
    ``lit-divnorm
    test`` wrote into the fit run it tested), ``config.yaml`` and ``metrics.csv``.

    A summary without a field (one written by an older sweep) is completed from the files:
    the seed from ``config.yaml``, the steps from ``metrics.csv``, the schedule from the
    run's own ``config.yaml`` (what it was asked to run); ``experiment`` names it when the
    summary does not. Facts no file holds (device, versions, commit) stay ``None``.
    """
    log_dir = Path(log_dir)
    done = log_dir / DONE_MARKER
    if not done.is_file():
        done = log_dir / TESTED_MARKER  # a plain fit, then `lit-divnorm test` of its weights
    if not done.is_file():
        raise ValueError(
            f"log_dir {str(log_dir)!r} holds no {DONE_MARKER} or {TESTED_MARKER} marker: "
            "not finished and tested"
        )
    summary = json.loads(done.read_text())
    experiment = summary.get("experiment") or experiment
    if not experiment:
        raise ValueError(f"{done} names no experiment; pass experiment='<area>/<config stem>'")
    config_file = log_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    metrics_file = log_dir / "metrics.csv"
    rows = read_metric_rows(metrics_file)
    metric = metric_of(experiment)
    test_metrics = {
        key: float(value)
        for key, value in summary.get("test_metrics", {}).items()
        if key.startswith("test/")
    }
    logged_steps, epochs = training_progress(rows)
    steps = int(summary.get("global_step", logged_steps))
    schedule = summary.get("schedule_steps")
    if "schedule_steps" not in summary:  # the config file's own schedule, else the run's
        per_epoch = steps_per_epoch(steps, epochs)
        own = config.get("trainer") or {}
        if summary.get("config") and Path(summary["config"]).is_file():
            with contextlib.suppress(ValueError):
                own = resolved_config(summary["config"])["trainer"]
        schedule = schedule_steps(own, per_epoch)
    seed = summary.get("seed", config.get("seed_everything"))
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    batch = batch_facts(config, summary.get("world_size"), summary.get("per_device_batch"))
    overrides = summary.get("overrides", [])
    return Record(
        experiment=experiment,
        seed=seed,
        metric=metric,
        value=_finite(test_metrics.get(metric)) if metric else None,
        test_metrics=test_metrics,
        steps=steps,
        schedule_steps=schedule,
        wall_time_s=summary.get("wall_time_s", _minutes_to_seconds(summary.get("minutes"))),
        device=summary.get("device"),
        threads=summary.get("threads"),
        versions=summary.get("versions", {}),
        git_commit=summary.get("git_commit"),
        git_dirty=summary.get("git_dirty"),
        config_sha256=config_hash(config, schedule, batch["global"]),
        config=normalized_config(config),
        batch=batch,
        command=_portable_or_none(
            repository_path(summary.get("config")), overrides, experiment, schedule
        )
        or summary.get("command"),
        overrides=overrides,
        curves=summary["curves"] if "curves" in summary else curves_of(rows, metric),
        source={
            "kind": kind,
            "run_dir": str(log_dir.resolve()),
            "metrics_sha256": file_sha256(metrics_file),
            "resumed_from_step": summary.get("resumed_from_step", 0),
            "steps_per_epoch": summary.get("steps_per_epoch"),
        },
    ).as_dict()


def _minutes_to_seconds(minutes: Any) -> float | None:
    return round(float(minutes) * 60.0, 1) if isinstance(minutes, (int, float)) else None


def record_path(record: dict[str, Any], results_dir: str | Path) -> Path:
    """``results_dir/<experiment>/seed<S>_<first 12 hex of the metrics' SHA-256>.json``."""
    run_id = str(record["source"]["metrics_sha256"])[:12]
    seed = "unseeded" if record["seed"] is None else f"seed{record['seed']}"
    return Path(results_dir) / record["experiment"] / f"{seed}_{run_id}.json"


def write_record(record: dict[str, Any], results_dir: str | Path) -> Path:
    """Write ``record`` (checked by :func:`check_record`) atomically; returns its path."""
    check_record(record, "record")
    path = record_path(record, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a record of :data:`SCHEMA` with every field, else ``ValueError``
    naming ``where`` and what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{where}: schema must be {SCHEMA}, got {record.get('schema')!r}")
    missing = [name for name in RECORD_FIELDS if name not in record]
    if missing:
        raise ValueError(f"{where}: the record lacks the fields {missing}")
    seed = record["seed"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{where}: seed must be an int (or null: unseeded), got {seed!r}")
    return record


def load_records(results_dir: str | Path) -> dict[Path, dict[str, Any]]:
    """``{path: record}`` of every ``*.json`` below ``results_dir``, sorted by path; a file
    that is not a record raises ``ValueError`` naming it."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ValueError(f"results_dir must be an existing folder, got {str(results_dir)!r}")
    records = {}
    for path in sorted(results_dir.rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from error
        records[path] = check_record(record, str(path))
    return records


def data_variable(experiment: str) -> str:
    """The shell variable that stands for a machine's data folder of ``experiment`` in a
    record's command: ``"cifar10/dn_star"`` -> ``"$CIFAR10_DIR"``."""
    return "$" + re.sub(r"\W", "_", experiment.split("/", 1)[0]).upper() + "_DIR"


def portable_command(
    config_file: str, flags: Iterable[str], experiment: str, schedule: int | None
) -> str:
    """A command that re-runs a record's run on any machine: ``fit`` of the repository's
    ``config_file`` with ``flags`` (a data folder as :func:`data_variable`; no
    ``--ckpt_path``: the record is the whole run; no ``--trainer.max_steps`` equal to the
    config's own ``schedule``), then ``test`` of its last checkpoint.

    A flag that keeps a ``<placeholder>`` raises ``ValueError``: the command could not run.
    """
    data = f"--data.data_dir {data_variable(experiment)}"
    kept = []
    for flag in flags:
        name, _, value = flag.replace("=", " ", 1).partition(" ")
        if name == "--data.data_dir":
            continue
        if name == "--ckpt_path" or (name == "--trainer.max_steps" and value == str(schedule)):
            continue
        if _PLACEHOLDER.search(flag):
            raise ValueError(
                f"the fit flag {flag!r} of {config_file} keeps a placeholder: name the class "
                "or value it stands for, so that the record's command can be re-run"
            )
        kept.append(flag)
    fit = " ".join(["lit-divnorm fit --config", config_file, data, *kept])
    return f"{fit} && lit-divnorm test --config {config_file} {data} --ckpt_path last"


def _portable_or_none(
    config_file: str, flags: list[str], experiment: str, schedule: int | None
) -> str | None:
    """:func:`portable_command`, ``None`` when a flag keeps a placeholder (allowed in the
    first part of a run made in parts, whose record is never written alone)."""
    try:
        return portable_command(config_file, flags, experiment, schedule)
    except ValueError:
        return None
