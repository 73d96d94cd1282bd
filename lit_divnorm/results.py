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

SCHEMA = 1
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

    Keeps ``model`` whole, ``data`` less its location keys (``data_dir``, ``num_workers``,
    ``pin_memory``, ``download``; image folders by their last part) and the trainer settings of
    :data:`TRAINER_KEYS`; drops ``seed_everything``, loggers, callbacks, devices and paths, so
    the runs of one experiment share the hash whatever their seed or machine.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a parsed config.yaml), got {type(config)}")
    trainer = config.get("trainer") or {}
    data = json.loads(json.dumps(config.get("data") or {}, default=str))
    arguments = data.get("init_args") if isinstance(data.get("init_args"), dict) else data
    for key in DATA_LOCATION_KEYS:
        arguments.pop(key, None)
    for key in DATA_FOLDER_KEYS:
        if arguments.get(key):
            arguments[key] = Path(str(arguments[key])).name
    return {
        "model": config.get("model"),
        "data": data,
        "trainer": {key: trainer.get(key) for key in TRAINER_KEYS},
    }


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of :func:`normalized_config` as canonical JSON (sorted keys)."""
    text = json.dumps(normalized_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
    """(optimizer steps run, epochs begun) from the ``train/*`` rows of ``metrics.csv``
    (Lightning logs a training row at step ``k`` for the ``k + 1``-th step)."""
    steps = epochs = 0
    for row in rows:
        if any(k.startswith("train/") and v not in (None, "") for k, v in row.items()):
            steps = max(steps, int(float(row.get("step") or 0)) + 1)
            if row.get("epoch") not in (None, ""):
                epochs = max(epochs, int(float(row["epoch"])) + 1)
    return steps, epochs


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
    :func:`lit_divnorm.sweep.run_one` wrote, ``config.yaml`` and ``metrics.csv``.

    A summary without a field (one written by an older sweep) is completed from the files:
    the seed from ``config.yaml``, the steps from ``metrics.csv``, the schedule from the
    run's own ``config.yaml`` (what it was asked to run); ``experiment`` names it when the
    summary does not. Facts no file holds (device, versions, commit) stay ``None``.
    """
    from lit_divnorm.sweep import DONE_MARKER

    log_dir = Path(log_dir)
    done = log_dir / DONE_MARKER
    if not done.is_file():
        raise ValueError(f"log_dir {str(log_dir)!r} holds no {DONE_MARKER} marker: not finished")
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
        "config_sha256": config_hash(config),
        "config": normalized_config(config),
        "command": summary.get("command"),
        "overrides": summary.get("overrides", []),
        "curves": summary["curves"] if "curves" in summary else curves_of(rows, metric),
        "source": {
            "kind": kind,
            "run_dir": str(log_dir.resolve()),
            "metrics_sha256": file_sha256(metrics_file),
            "resumed_from_step": summary.get("resumed_from_step", 0),
        },
    }


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


def run_md_fields(text: str) -> dict[str, str]:
    """The ``- Key: text`` bullets of a ``RUN.md`` (continuation lines joined by spaces)."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        match = _BULLET.match(line)
        if match:
            key = match.group(1).strip()
            fields[key] = match.group(2).strip()
        elif key is not None and line.startswith("  ") and line.strip():
            fields[key] += " " + line.strip()
        else:
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
    """The flags of the ``lit-divnorm fit`` command in ``command`` (its backquoted part),
    without ``--config``: ``["--trainer.max_steps 32000", ...]``."""
    match = re.search(r"`(lit-divnorm fit [^`]*)`", command)
    if match is None:
        return []
    parts = re.split(r"\s+(?=--)", " ".join(match.group(1).split()))
    return [part for part in parts[1:] if not part.startswith("--config")]


def import_run(folder: str | Path) -> dict[str, Any]:
    """The record of a run folder in the ``../shared/runs`` format (see its README.md).

    Reads ``RUN.md`` (config, commit, command, machine, steps, wall time), ``config.yaml``
    (seed, config hash), ``metrics.csv`` (steps and epochs run, validation curve),
    ``test_metrics.csv`` (the final test metrics) and ``test_every_*.log`` (a test curve).
    The steps, schedule and test figure that ``RUN.md`` states are checked against the files
    and the experiment config's own schedule (``ValueError`` naming the disagreement).
    """
    folder = Path(folder)
    run_md = folder / "RUN.md"
    if not run_md.is_file():
        raise ValueError(f"folder {str(folder)!r} holds no RUN.md: not a run in the shared format")
    fields = run_md_fields(run_md.read_text())
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
    schedule = schedule_steps(own, steps // epochs if epochs and steps % epochs == 0 else None)
    _check_stated_steps(fields, steps, epochs, schedule, own, run_md)
    _, machine = _field(fields, "Machine", run_md)
    versions = {"python": None, **dict.fromkeys(PACKAGES)}
    for name in PACKAGES:
        found = re.search(rf"\b{re.escape(name)} (\d+(?:\.\d+)+)", machine)
        versions[name] = found.group(1) if found else None
    config = yaml.safe_load((folder / "config.yaml").read_text())
    curves = curves_of(rows, metric)
    for log in sorted(folder.glob("test_every_*.log")):
        if metric == "test/acc" and parse_test_log(log):
            curves["test/acc"] = parse_test_log(log)
    command_key, command = _field(fields, "Command", run_md)
    metrics_files = [folder / "metrics.csv", folder / "test_metrics.csv"]
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
        "device": machine.split(", torch")[0].split(". ")[0],
        "threads": None,
        "versions": versions,
        "git_commit": full_commit(commit_match.group(1)),
        "git_dirty": None,  # RUN.md names the commit; local edits are not recorded
        "config_sha256": config_hash(config),
        "config": normalized_config(config),
        "command": command,
        "overrides": fit_flags(command),
        "curves": curves,
        "source": {
            "kind": "import",
            "run_dir": folder.name,
            "metrics_sha256": file_sha256(*metrics_files),
            "run_md_sha256": file_sha256(run_md),
            "run_md_title": run_md.read_text().splitlines()[0].lstrip("# ").strip(),
            "run_md_steps": _field(fields, "Steps", run_md)[1],
            "run_md_command_field": command_key,
            "config_file": config_path,
        },
    }


def _wall_time(machine: str) -> float | None:
    """Seconds of ``Wall time X min`` or ``Fit X min, test Y s`` in a RUN.md machine line."""
    total = None
    for pattern, scale in ((r"(?:Wall time|Fit) ([\d.]+) min", 60.0), (r"test ([\d.]+) s", 1.0)):
        found = re.search(pattern, machine)
        if found:
            total = (total or 0.0) + float(found.group(1)) * scale
    return round(total, 1) if total is not None else None


def _check_stated_test_value(fields: dict[str, str], value: float | None, run_md: Path) -> None:
    stated = [text for key, text in fields.items() if key.lower().startswith("test")]
    if value is None or not stated:
        raise ValueError(f"{run_md}: no test figure to compare with test_metrics.csv")
    figure = _NUMBER.search(stated[0])
    if figure is None:
        raise ValueError(f"{run_md}: the test line states no number")
    decimals = len(figure.group(0).split(".")[1]) if "." in figure.group(0) else 0
    if abs(_number(figure.group(0)) - value) > 0.5 * 10.0**-decimals + 1e-12:
        raise ValueError(
            f"{run_md} states the test figure {figure.group(0)}, but test_metrics.csv holds "
            f"{value}: the folder's files disagree"
        )


def _check_stated_steps(
    fields: dict[str, str],
    steps: int,
    epochs: int,
    schedule: int | None,
    own_trainer: dict[str, Any],
    run_md: Path,
) -> None:
    _, text = _field(fields, "Steps", run_md)
    of = re.match(r"\s*([\d,]+) of ([\d,]+)", text)
    if of:
        stated_steps, stated_schedule = int(_number(of.group(1))), int(_number(of.group(2)))
        if (stated_steps, stated_schedule) != (steps, schedule):
            raise ValueError(
                f"{run_md} states {stated_steps} of {stated_schedule} steps, but metrics.csv "
                f"shows {steps} steps and the config's schedule is {schedule}"
            )
        return
    whole = re.search(r"whole schedule \((\d+) epochs\b", text)
    if whole:
        stated_epochs = int(whole.group(1))
        if stated_epochs != epochs or stated_epochs != own_trainer.get("max_epochs"):
            raise ValueError(
                f"{run_md} states the whole schedule of {stated_epochs} epochs, but metrics.csv "
                f"shows {epochs} epochs and the config's schedule is "
                f"{own_trainer.get('max_epochs')} epochs"
            )
        return
    raise ValueError(
        f"{run_md}: the Steps line must read 'N of M' or 'the whole schedule (E epochs)'"
    )


def import_runs(folder: str | Path, results_dir: str | Path) -> list[Path]:
    """:func:`import_run` every subfolder of ``folder`` that holds a ``RUN.md`` and write the
    records into ``results_dir`` (none when any folder fails its checks); returns their
    paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"the import folder must be an existing folder, got {str(folder)!r}")
    runs = sorted(path.parent for path in folder.glob("*/RUN.md"))
    if not runs:
        raise ValueError(f"the import folder {str(folder)!r} holds no <run>/RUN.md")
    records = [import_run(run) for run in runs]  # every folder checked before one is written
    return [write_record(record, results_dir) for record in records]


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
