"""One small JSON per finished run: what ran, where, from which code, and what it measured.

    results/<area>/<config stem>/seed<S>_<run id>.json

:mod:`lit_divnorm.sweep` writes one when a run ends (:func:`build_record` of its run folder,
then :func:`write_record`); ``lit-divnorm report --import FOLDER`` turns runs made elsewhere
(folders in the ``../shared/runs`` format, :func:`import_run`) into the same records;
:mod:`lit_divnorm.report` builds ``RESULTS.md`` from them alone. Every number in a record is
read from the run's own files (``metrics.csv``, ``config.yaml``, the sweep's ``DONE`` summary,
an imported run's ``test_metrics.csv`` and test log), never typed in.

Fields of a record (:data:`RECORD_FIELDS`):
    experiment: ``"<area>/<config stem>"`` (``"cifar10/dn_star"``); seed: the run's
    ``seed_everything``; metric / value: the paper's metric for the experiment
    (:mod:`lit_divnorm.paper_results`) and the run's final test value (``None`` when the
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
import csv
import hashlib
import importlib
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import warnings
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from lit_divnorm.checkpoint import atomic_write_text
from lit_divnorm.paper_results import PAPER_TABLES
from lit_divnorm.runs import DONE_MARKER, TESTED_MARKER

SCHEMA = 2
RECORD_FIELDS = (
    "schema",
    "experiment",
    "seed",
    "metric",
    "value",
    "test_metrics",
    "steps",
    "schedule_steps",
    "complete",
    "wall_time_s",
    "device",
    "threads",
    "versions",
    "git_commit",
    "git_dirty",
    "config_sha256",
    "config",
    "batch",
    "command",
    "overrides",
    "curves",
    "source",
)
PACKAGES = ("torch", "lightning", "torchvision", "torchmetrics", "numpy", "lit-divnorm")
# trainer settings that change what a run computes; the others say where and how it ran
TRAINER_KEYS = (
    "max_steps",
    "max_epochs",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "accumulate_grad_batches",
    "limit_train_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
)
DATA_LOCATION_KEYS = ("data_dir", "num_workers", "pin_memory", "download", "persistent_workers")
# switches of how a run executes, not what it computes: left out of a run's identity (a new
# defaulted switch must not turn one experiment into two)
ENGINEERING_KEYS = ("compile", "device_resident", *DATA_LOCATION_KEYS, "prefetch_factor")
SCHEDULE_KEYS = ("max_steps", "max_epochs")  # a run's identity holds its config's own schedule
DATA_FOLDER_KEYS = ("val_dir", "test_dir", "train_dir")  # kept by their last part (Set14)
REPOSITORY = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ facts about a run


def metric_of(experiment: str) -> str | None:
    """The metric the paper reports for ``experiment`` (``"ptb/lstm/dn"`` -> ``"test/ppl"``),
    ``None`` when no paper table holds its area."""
    area = experiment.rsplit("/", 1)[0]
    for spec in PAPER_TABLES.values():
        if any(area == a or (a.endswith("/") and area.startswith(a)) for a in spec["areas"]):
            return spec["metric"]
    return None


def normalized_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved LightningCLI config that decides what a run computes.

    Keeps ``model`` and ``data`` less the engineering switches of :data:`ENGINEERING_KEYS`
    (``compile``, ``device_resident``, ``data_dir``, ``num_workers``, ...; image folders by
    their last part; a data ``seed`` of ``None``, which follows ``seed_everything``) and the
    trainer settings of :data:`TRAINER_KEYS`; drops ``seed_everything``, loggers, callbacks,
    devices and paths, so the runs of one experiment share it whatever their seed or machine.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a parsed config.yaml), got {type(config)}")
    trainer = config.get("trainer") or {}
    model = json.loads(json.dumps(config.get("model"), default=str))
    data = json.loads(json.dumps(config.get("data") or {}, default=str))
    for part in (model, data):
        arguments = _init_args(part)
        for key in ENGINEERING_KEYS:
            arguments.pop(key, None)
    arguments = _init_args(data)
    if "seed" in arguments and arguments["seed"] is None:
        del arguments["seed"]
    for key in DATA_FOLDER_KEYS:
        if arguments.get(key):
            arguments[key] = Path(str(arguments[key])).name
    return {
        "model": model,
        "data": data,
        "trainer": {key: trainer.get(key) for key in TRAINER_KEYS},
    }


def _init_args(part: Any) -> dict[str, Any]:
    """The ``init_args`` of a ``class_path`` mapping, the mapping itself without one (``{}``
    for anything else)."""
    if not isinstance(part, dict):
        return {}
    return part["init_args"] if isinstance(part.get("init_args"), dict) else part


def batch_facts(
    config: dict[str, Any], world_size: int | None = None, per_device: int | None = None
) -> dict[str, Any]:
    """The effective batch of a run: ``world_size`` (processes: given, else ``num_nodes`` x
    ``devices`` when the config fixes them, ``None`` when it does not: ``devices: auto`` on a
    machine not known), ``devices``, ``num_nodes``, ``accumulate_grad_batches``,
    ``per_device`` (given: what the run trained on, e.g. after
    :class:`~lit_divnorm.global_batch.GlobalBatch` divided it; else the data's ``batch_size``)
    and ``global`` = per_device x world_size x accumulate_grad_batches."""
    trainer = config.get("trainer") or {}
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if world_size is None:
        if isinstance(devices, list):
            world_size = len(devices) * nodes
        elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
            world_size = devices * nodes
        elif isinstance(devices, str) and devices.strip().isdigit() and int(devices) > 0:
            world_size = int(devices) * nodes
        elif trainer.get("accelerator") == "cpu":
            world_size = nodes  # Lightning's CPU accelerator runs one process per node
    accumulate = trainer.get("accumulate_grad_batches") or 1
    if per_device is None:
        per_device = _init_args(config.get("data")).get("batch_size")
    per_device = per_device if isinstance(per_device, int) else None
    known = world_size is not None and per_device is not None
    return {
        "world_size": world_size,
        "devices": devices,
        "num_nodes": nodes,
        "accumulate_grad_batches": accumulate,
        "per_device": per_device,
        "global": per_device * world_size * accumulate if known else None,
    }


def config_hash(
    config: dict[str, Any], schedule: int | None = None, global_batch: int | None = None
) -> str:
    """The identity of an experiment: SHA-256 (canonical JSON) of :func:`normalized_config`
    with the trainer's ``max_steps``/``max_epochs`` replaced by ``schedule`` (the steps of the
    experiment config's own schedule: a run stopped early is a partial run of the same
    experiment, not another one) and the ``global_batch`` (per-device batch x processes x
    accumulation: 4 GPUs at the paper's batch each are another experiment)."""
    identity = normalized_config(config)
    for key in SCHEDULE_KEYS:
        identity["trainer"].pop(key, None)
    identity["schedule_steps"] = schedule
    identity["global_batch"] = global_batch
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.init_args.norm": ..., ...}``: the leaves of nested dicts by dotted path."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def row_problem(
    record: dict[str, Any], own_config: dict[str, Any], allow_partial: bool = False
) -> str | None:
    """Why a run's ``record`` is not a row of its experiment config (``own_config``: the config
    file resolved alone, no overrides), ``None`` when it is.

    A row runs the config's own model, data and trainer settings at its own global batch
    (one process at ``data.batch_size``, or :class:`~lit_divnorm.global_batch.GlobalBatch`
    over several) for its own schedule. A run stopped early by a shorter ``max_steps`` or
    ``max_epochs`` (a smoke run) is a row only with ``allow_partial`` (the user marked it
    partial); a run of a longer schedule never is.
    """
    own = normalized_config(own_config)
    ran = record["config"]
    own_trainer, ran_trainer = own["trainer"], ran.get("trainer") or {}
    own_flat = _flat({k: v for k, v in own.items() if k != "trainer"})
    ran_flat = _flat({k: v for k, v in ran.items() if k != "trainer"})
    for key in TRAINER_KEYS:
        if key not in SCHEDULE_KEYS:
            own_flat[f"trainer.{key}"] = own_trainer.get(key)
            ran_flat[f"trainer.{key}"] = ran_trainer.get(key)
    changed = sorted(
        k for k in own_flat.keys() | ran_flat.keys() if own_flat.get(k) != ran_flat.get(k)
    )
    if changed:
        shown = ", ".join(
            f"{k} {ran_flat.get(k)!r} (config: {own_flat.get(k)!r})" for k in changed[:4]
        )
        return f"its settings differ from the config's: {shown}"
    own_global = batch_facts(own_config, 1 if _devices_unset(own_config) else None)["global"]
    ran_global = (record.get("batch") or {}).get("global")
    if own_global is not None and ran_global != own_global:
        return f"its global batch is {ran_global}, the config's {own_global}"
    schedule = record["schedule_steps"]
    ran_schedule = schedule_steps(ran_trainer, _steps_per_epoch(record))
    if schedule is not None and ran_schedule is not None and ran_schedule > schedule:
        return f"it ran a longer schedule ({ran_schedule} steps) than the config's {schedule}"
    if not record["complete"] and not allow_partial:
        return (
            f"it ran {record['steps']} of the config's {schedule} steps (a smoke run or a run "
            "stopped early; mark a partial row on purpose with sweep --partial)"
        )
    return None


def _devices_unset(config: dict[str, Any]) -> bool:
    devices = (config.get("trainer") or {}).get("devices")
    return devices in (None, "auto")


def _steps_per_epoch(record: dict[str, Any]) -> int | None:
    per_epoch = (record.get("source") or {}).get("steps_per_epoch")
    return per_epoch if isinstance(per_epoch, int) else None


def file_sha256(*paths: Path) -> str:
    """SHA-256 over the bytes of ``paths`` in order (those that exist)."""
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """``{"python": ..., package: version}`` of the packages a result depends on: the
    module's own ``__version__`` where it has one (torch's names its build, ``+cu130``),
    else the installed distribution's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name.replace("-", "_"))
            found[name] = str(getattr(module, "__version__", None) or metadata.version(name))
        except (ImportError, metadata.PackageNotFoundError):
            found[name] = None
    return found


def git_state(folder: Path = REPOSITORY) -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the repository holding ``folder``;
    ``(None, None)`` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def full_commit(short: str, folder: Path = REPOSITORY) -> str:
    """The 40-hex commit ``short`` abbreviates in this repository (``short`` if unknown)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--verify", f"{short}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return short


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else :func:`platform.processor`."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: Any) -> str:
    """``"cuda: NVIDIA H200"`` or ``"cpu: <model name>"`` for a ``torch.device``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {cpu_name()}"
    return str(device)


def resolved_config(config: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The full ``fit`` config LightningCLI resolves from ``config`` (fragments and defaults
    included), as ``--print_config`` prints it; nothing is instantiated."""
    from lit_divnorm.cli import run_cli

    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            run_cli(["fit", "--config", str(config), *overrides, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise ValueError(f"config {str(config)!r} could not be parsed") from stop
    parsed = yaml.safe_load(output.getvalue())
    if not isinstance(parsed, dict) or "trainer" not in parsed:
        raise ValueError(f"config {str(config)!r} did not resolve to a fit config")
    return parsed


def schedule_steps(trainer: dict[str, Any], steps_per_epoch: int | None) -> int | None:
    """Steps of a schedule: ``max_steps`` when set (> 0), else ``max_epochs`` x
    ``steps_per_epoch`` (``None`` when that is unknown or the schedule has no end)."""
    max_steps = trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    max_epochs = trainer.get("max_epochs")
    if isinstance(max_epochs, int) and max_epochs > 0 and steps_per_epoch:
        return max_epochs * steps_per_epoch
    return None


# ------------------------------------------------------------------ metrics files


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


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ------------------------------------------------------------------ records of run folders


def build_record(
    log_dir: str | Path, experiment: str | None = None, kind: str = "sweep"
) -> dict[str, Any]:
    """The record of a finished run from its folder: the ``DONE`` summary that
    :func:`lit_divnorm.sweep.run_one` wrote (else the ``TESTED`` summary that ``lit-divnorm
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
    if "schedule_steps" not in summary:
        per_epoch = steps // epochs if epochs and steps % epochs == 0 else None
        schedule = schedule_steps(config.get("trainer") or {}, per_epoch)
    seed = summary.get("seed", config.get("seed_everything"))
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    batch = batch_facts(config, summary.get("world_size"), summary.get("per_device_batch"))
    overrides = summary.get("overrides", [])
    return {
        "schema": SCHEMA,
        "experiment": experiment,
        "seed": seed,
        "metric": metric,
        "value": _finite(test_metrics.get(metric)) if metric else None,
        "test_metrics": test_metrics,
        "steps": steps,
        "schedule_steps": schedule,
        "complete": schedule is not None and steps >= schedule,
        "wall_time_s": summary.get("wall_time_s", _minutes_to_seconds(summary.get("minutes"))),
        "device": summary.get("device"),
        "threads": summary.get("threads"),
        "versions": summary.get("versions", {}),
        "git_commit": summary.get("git_commit"),
        "git_dirty": summary.get("git_dirty"),
        "config_sha256": config_hash(config, schedule, batch["global"]),
        "config": normalized_config(config),
        "batch": batch,
        "command": _portable_or_none(
            repository_path(summary.get("config")), overrides, experiment, schedule
        )
        or summary.get("command"),
        "overrides": overrides,
        "curves": summary["curves"] if "curves" in summary else curves_of(rows, metric),
        "source": {
            "kind": kind,
            "run_dir": str(log_dir.resolve()),
            "metrics_sha256": file_sha256(metrics_file),
            "resumed_from_step": summary.get("resumed_from_step", 0),
            "steps_per_epoch": summary.get("steps_per_epoch"),
        },
    }


def repository_path(path: str | None) -> str:
    """``path`` relative to this repository when it lies inside it (``configs/...``), else
    as given (``"?"`` for none)."""
    if not path:
        return "?"
    with contextlib.suppress(ValueError):
        return Path(path).resolve().relative_to(REPOSITORY).as_posix()
    return str(path)


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


# ------------------------------------------------------------------ import of shared runs

_BULLET = re.compile(r"^- ([^:]+):\s*(.*)$")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_PLACEHOLDER = re.compile(r"<[^<>]*>")
_CONTINUES = re.compile(r"continues `\.\./([^`/]+)/?`")


def run_md_fields(text: str) -> dict[str, str]:
    """The ``- Key: text`` bullets of a ``RUN.md``: indented lines below a bullet (nested
    bullets, a code block, also after a blank line) join its text with spaces."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        match = _BULLET.match(line)
        if match:
            key = match.group(1).strip()
            fields[key] = match.group(2).strip()
        elif key is not None and line.startswith("  ") and line.strip():
            fields[key] = (fields[key] + " " + line.strip()).strip()
        elif line.strip():
            key = None
    return fields


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _field(fields: dict[str, str], prefix: str, run_md: Path) -> tuple[str, str]:
    for key, value in fields.items():
        if key.lower().startswith(prefix.lower()):
            return key, value
    raise ValueError(f"{run_md}: no '- {prefix}...:' line (found {sorted(fields)})")


def parse_test_log(path: Path) -> list[list[float]]:
    """``[[step, accuracy], ...]`` of a periodic test log (``step S test_acc A ...`` lines)."""
    points = []
    for line in path.read_text().splitlines():
        match = re.match(r"^step (\d+) test_acc ([\d.]+)\b", line.strip())
        if match:
            points.append([int(match.group(1)), float(match.group(2))])
    return points


def fit_flags(command: str) -> list[str]:
    """The flags of the ``lit-divnorm fit`` command in ``command`` (backquoted, or a code
    block ending at ``then``), without ``--config``: ``["--trainer.max_steps 32000", ...]``."""
    match = re.search(r"`(lit-divnorm fit [^`]*)`", command) or re.search(
        r"(lit-divnorm fit .*?)(?:\s+then\b|$)", command
    )
    if match is None:
        return []
    parts = re.split(r"\s+(?=--)", " ".join(match.group(1).split()))
    return [part for part in parts[1:] if not part.startswith("--config")]


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


def _stated_test_value(fields: dict[str, str], run_md: Path) -> str:
    """The test figure ``RUN.md`` states: the number right before ``(`test_metrics.csv```,
    else the first number of its ``Test ...`` line."""
    stated = [text for key, text in fields.items() if key.lower().startswith("test")]
    if not stated:
        raise ValueError(f"{run_md}: no '- Test ...:' line to compare with test_metrics.csv")
    beside = re.findall(r"(\d[\d,]*(?:\.\d+)?)\s*\(`test_metrics\.csv`", stated[0])
    figure = beside[-1] if beside else None
    if figure is None:
        found = _NUMBER.search(stated[0].split(":", 1)[-1])
        figure = found.group(0) if found else None
    if figure is None:
        raise ValueError(f"{run_md}: the test line states no number")
    return figure


def _check_stated_test_value(fields: dict[str, str], value: float | None, run_md: Path) -> None:
    if value is None:
        raise ValueError(f"{run_md}: test_metrics.csv holds no figure of the paper's metric")
    figure = _stated_test_value(fields, run_md)
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    if abs(_number(figure) - value) > 0.5 * 10.0**-decimals + 1e-12:
        raise ValueError(
            f"{run_md} states the test figure {figure}, but test_metrics.csv holds "
            f"{value}: the folder's files disagree"
        )


def _stated_steps(fields: dict[str, str], title: str, run_md: Path) -> dict[str, int]:
    """What ``RUN.md`` says of the steps: ``{"steps", "schedule"}`` (``N of M``), ``{"epochs"}``
    (``the whole schedule (E epochs)``), ``{"schedule"}`` (``the full schedule of N steps``)
    or ``{"start", "steps"}`` (``steps A to B``), from its Steps line, else its title."""
    text = next((v for k, v in fields.items() if k.lower().startswith("steps")), None)
    for source in (text, title):
        if source is None:
            continue
        of = re.search(r"(?:^|\s)([\d,]+) of (?:the schedule's )?([\d,]+)", source)
        if of:
            return {"steps": int(_number(of.group(1))), "schedule": int(_number(of.group(2)))}
        whole = re.search(r"whole schedule \((\d+) epochs\b", source)
        if whole:
            return {"epochs": int(whole.group(1))}
        full = re.search(r"full schedule of ([\d,]+) steps", source)
        if full:
            return {"schedule": int(_number(full.group(1)))}
        span = re.search(r"steps ([\d,]+) to ([\d,]+)", source)
        if span:
            return {"start": int(_number(span.group(1))), "steps": int(_number(span.group(2)))}
    raise ValueError(
        f"{run_md}: the Steps line or the title must read 'N of M', 'the whole schedule "
        "(E epochs)', 'the full schedule of N steps' or 'steps A to B'"
    )


def _check_stated_steps(
    stated: dict[str, int],
    steps: int,
    start: int,
    epochs: int,
    schedule: int | None,
    own_trainer: dict[str, Any],
    run_md: Path,
) -> None:
    found = {
        "steps": steps,
        "schedule": schedule,
        "start": start,
        "epochs": epochs,
    }
    wrong = {key: value for key, value in stated.items() if found[key] != value}
    if "epochs" in stated and own_trainer.get("max_epochs") != stated["epochs"]:
        wrong["epochs of the config"] = stated["epochs"]
    if wrong:
        if "epochs" in stated:
            said = f"the whole schedule of {stated['epochs']} epochs"
        elif "start" in stated:
            said = f"steps {stated['start']} to {stated['steps']}"
        elif "steps" in stated:
            said = f"{stated['steps']} of {stated['schedule']} steps"
        else:
            said = f"the full schedule of {stated['schedule']} steps"
        raise ValueError(
            f"{run_md} states {said}, but metrics.csv shows {steps} steps from step {start} "
            f"over {epochs} epochs and the config's schedule is {schedule} steps "
            f"({own_trainer.get('max_epochs')} epochs); disagreeing: {sorted(wrong)}"
        )


def import_run(folder: str | Path) -> dict[str, Any]:
    """The record of a run folder in the ``../shared/runs`` format (see its README.md).

    Reads ``RUN.md`` (config, commit, command, machine, steps, wall time), ``config.yaml``
    (seed, identity), ``metrics.csv`` (steps and epochs run, curves), ``test_metrics.csv``
    (the final test metrics) and ``test_every_*.log`` (a test curve). The steps, schedule and
    test figure that ``RUN.md`` states are checked against the files and the experiment
    config's own schedule (``ValueError`` naming the disagreement). A folder whose RUN.md says
    it ``continues `../<run>``` is one part of a run: ``source["continues"]`` names the earlier
    part, and :func:`import_runs` joins the parts into one record.
    """
    folder = Path(folder)
    run_md = folder / "RUN.md"
    if not run_md.is_file():
        raise ValueError(f"folder {str(folder)!r} holds no RUN.md: not a run in the shared format")
    text = run_md.read_text()
    title = text.splitlines()[0].lstrip("# ").strip()
    fields = run_md_fields(text)
    _, config_text = _field(fields, "Config", run_md)
    config_match = re.search(r"`(configs/[^`]+\.ya?ml)`", config_text)
    commit_match = re.search(r"commit ([0-9a-f]{7,40})\b", config_text)
    if config_match is None or commit_match is None:
        raise ValueError(f"{run_md}: the Config line must name `configs/...yaml` and a commit")
    config_path = config_match.group(1)
    experiment_config = REPOSITORY / config_path
    if not experiment_config.is_file():
        raise ValueError(f"{run_md}: config {config_path} is not in this repository")
    from lit_divnorm.runs import experiment_name

    experiment = experiment_name(experiment_config)
    metric = metric_of(experiment)
    rows = read_metric_rows(folder / "metrics.csv")
    steps, epochs = training_progress(rows)
    if steps == 0:
        raise ValueError(f"{folder}: metrics.csv holds no training rows")
    continues = _CONTINUES.search(text)
    train_steps = [int(float(r["step"])) for r in rows if r.get("step") not in (None, "")]
    start = min(train_steps) if continues else 0
    test_rows = read_metric_rows(folder / "test_metrics.csv")
    if not test_rows:
        raise ValueError(f"{folder}: no test_metrics.csv with the final test metrics")
    test_metrics = {
        key: float(value)
        for key, value in test_rows[-1].items()
        if key.startswith("test/") and value not in (None, "")
    }
    value = test_metrics.get(metric) if metric else None
    _check_stated_test_value(fields, value, run_md)
    own = resolved_config(experiment_config)["trainer"]
    per_epoch = None
    if epochs and steps % epochs == 0:
        per_epoch = steps // epochs
    schedule = schedule_steps(own, per_epoch)
    stated = _stated_steps(fields, title, run_md)
    _check_stated_steps(stated, steps, start, epochs, schedule, own, run_md)
    _, machine = _field(fields, "Machine", run_md)
    versions = {"python": None, **dict.fromkeys(PACKAGES)}
    for name in PACKAGES:
        found = re.search(rf"\b{re.escape(name)} (\d+(?:\.\d+)+)", machine)
        versions[name] = found.group(1) if found else None
    config = yaml.safe_load((folder / "config.yaml").read_text())
    device = machine.split(", torch")[0].split(". ")[0]
    batch = batch_facts(config, 1 if "CPU" in device and "GPU" not in device else None)
    curves = curves_of(rows, metric)
    for log in sorted(folder.glob("test_every_*.log")):
        if metric == "test/acc" and parse_test_log(log):
            curves["test/acc"] = parse_test_log(log)
    command_key, command = _field(fields, "Command", run_md)
    metrics_files = [folder / "metrics.csv", folder / "test_metrics.csv"]
    commit = full_commit(commit_match.group(1))
    source = {
        "kind": "import",
        "run_dir": folder.name,
        "metrics_sha256": file_sha256(*metrics_files),
        "run_md_sha256": file_sha256(run_md),
        "run_md_title": title,
        "run_md_steps": next((v for k, v in fields.items() if k.startswith("Steps")), title),
        "run_md_command_field": command_key,
        "config_file": config_path,
    }
    if continues:
        source["continues"] = continues.group(1)
        source["start_step"] = start
    return {
        "schema": SCHEMA,
        "experiment": experiment,
        "seed": int(config["seed_everything"]),
        "metric": metric,
        "value": value,
        "test_metrics": test_metrics,
        "steps": steps,
        "schedule_steps": schedule,
        "complete": schedule is not None and steps >= schedule,
        "wall_time_s": _wall_time(machine),
        "device": device,
        "threads": None,
        "versions": versions,
        "git_commit": commit,
        "git_dirty": None,  # RUN.md names the commit; local edits are not recorded
        "config_sha256": config_hash(config, schedule, batch["global"]),
        "config": normalized_config(config),
        "batch": batch,
        "command": _portable_or_none(config_path, fit_flags(command), experiment, schedule),
        "overrides": fit_flags(command),
        "curves": curves,
        "source": source,
    }


def _portable_or_none(
    config_file: str, flags: list[str], experiment: str, schedule: int | None
) -> str | None:
    """:func:`portable_command`, ``None`` when a flag keeps a placeholder (allowed in the
    first part of a run made in parts, whose record is never written alone)."""
    try:
        return portable_command(config_file, flags, experiment, schedule)
    except ValueError:
        return None


def _wall_time(machine: str) -> float | None:
    """Seconds of ``Wall time X min`` or ``Fit X min, test Y s`` in a RUN.md machine line."""
    total = None
    for pattern, scale in ((r"(?:Wall time|Fit) ([\d.]+) min", 60.0), (r"test ([\d.]+) s", 1.0)):
        found = re.search(pattern, machine)
        if found:
            total = (total or 0.0) + float(found.group(1)) * scale
    return round(total, 1) if total is not None else None


def join_parts(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """One record of a run made in two parts: ``then`` continued ``first`` from the step
    where ``first`` stopped (its checkpoint). The joined record has ``then``'s final figures,
    steps and command, both parts' wall time, curves (each step once) and commits
    (``source["parts"]``: run folder, commit, steps, overrides of each); ``ValueError`` when
    the parts are not of one run (another experiment, seed or identity, or a gap)."""
    where = f"{then['source']['run_dir']} continues {first['source']['run_dir']}"
    for key in ("experiment", "seed", "config_sha256"):
        if first[key] != then[key]:
            raise ValueError(f"{where}, but their {key} differ: {first[key]!r}, {then[key]!r}")
    if then["source"]["start_step"] != first["steps"]:
        raise ValueError(
            f"{where}, but it starts at step {then['source']['start_step']} and the first part "
            f"stopped at step {first['steps']}"
        )
    curves = {}
    for name in sorted({*first["curves"], *then["curves"]}):
        points = {int(step): value for step, value in first["curves"].get(name, [])}
        points.update({int(step): value for step, value in then["curves"].get(name, [])})
        curves[name] = [[step, points[step]] for step in sorted(points)]
    parts = []
    for record in (first, then):
        start = record["source"].get("start_step", 0)
        parts += record["source"].get("parts") or [
            {
                "run_dir": record["source"]["run_dir"],
                "git_commit": record["git_commit"],
                "steps": [start, record["steps"]],
                "overrides": record["overrides"],
                "metrics_sha256": record["source"]["metrics_sha256"],
                "run_md_sha256": record["source"]["run_md_sha256"],
            }
        ]
    walls = [first["wall_time_s"], then["wall_time_s"]]
    source = {**then["source"], "parts": parts}
    source.pop("continues")
    source.pop("start_step")
    return {
        **then,
        "wall_time_s": None if None in walls else round(sum(walls), 1),
        "curves": curves,
        "source": source,
    }


def import_runs(folder: str | Path, results_dir: str | Path) -> list[Path]:
    """:func:`import_run` every subfolder of ``folder`` that holds a ``RUN.md``, join the
    parts of runs made in parts (:func:`join_parts`; a part never counts as a run of its own)
    and write the records into ``results_dir`` (none when any folder fails its checks);
    returns their paths. A record of a part that an earlier import wrote is removed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"the import folder must be an existing folder, got {str(folder)!r}")
    runs = sorted(path.parent for path in folder.glob("*/RUN.md"))
    if not runs:
        raise ValueError(f"the import folder {str(folder)!r} holds no <run>/RUN.md")
    records = {run.name: import_run(run) for run in runs}  # all checked before one is written
    joined = dict(records)
    for name, record in records.items():
        earlier = record["source"].get("continues")
        if earlier is None:
            continue
        if earlier not in records:
            raise ValueError(f"{name} continues {earlier}, which is not in {str(folder)!r}")
        first = joined.pop(earlier)
        joined[name] = join_parts(first, joined[name])
    parts = {earlier for r in records.values() if (earlier := r["source"].get("continues"))}
    for record in joined.values():
        if record["command"] is None:  # raises, naming the flag
            portable_command(
                record["source"]["config_file"],
                record["overrides"],
                record["experiment"],
                record["schedule_steps"],
            )
    results_dir = Path(results_dir)
    if results_dir.is_dir():
        for path, old in load_records(results_dir).items():
            if old["source"].get("kind") == "import" and old["source"]["run_dir"] in parts:
                path.unlink()
    return [write_record(record, results_dir) for record in joined.values()]


def environment_facts(root_device: Any) -> dict[str, Any]:
    """What a record says about the machine and code of the running process."""
    import torch

    commit, dirty = git_state()
    return {
        "device": describe_device(root_device),
        "threads": torch.get_num_threads(),
        "versions": package_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
        "python_executable": sys.executable,
        "host_cpus": os.cpu_count(),
    }
