"""Run folders named by their experiment, and the checkpoint ``--ckpt_path last`` resumes.

Every run of ``lit-divnorm fit --config configs/<area>/<name>.yaml`` logs into::

    <save_dir>/<area>/<name>/version_<N>/    metrics.csv, config.yaml, checkpoints/last.ckpt

(``save_dir`` is the logger's, ``runs`` by default; ``area`` is the config's folder below the
nearest ancestor named ``configs``, e.g. ``cifar10``, ``ptb/lstm``, ``sr/x3``), whatever
trainer file is added. A new run takes the next free ``N``; ``--ckpt_path last`` continues the
latest version that holds a checkpoint, in its own folder; a named version
(``--trainer.logger.init_args.version=slurm_$SLURM_JOB_ID``) is that folder. ``test``,
``validate`` and ``predict`` log into ``<area>/<name>/<subcommand>_<N>/``. Nothing here
deletes a file: a fresh run never starts in a folder that holds another run's files, and
:class:`RunCSVLogger` keeps the rows of a resumed run's ``metrics.csv`` (Lightning's
``CSVLogger`` deletes the file), moving rows that the killed run logged after its checkpoint
to ``metrics.superseded.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from lit_divnorm.checkpoint import atomic_write_text, load_checkpoint_safely
from lit_divnorm.stopping import STOPPED_MARKER

VERSION_PATTERN = re.compile(r"^version_(\d+)$")
EVALUATION_PATTERN = re.compile(r"^(test|validate|predict)_\d+$")  # logs of evaluation commands
DONE_MARKER = "DONE"  # a sweep's run that fitted and tested (JSON summary)
FAILED_MARKER = "FAILED"  # a run that raised (the traceback)
TESTED_MARKER = "TESTED"  # a fit run whose final checkpoint `lit-divnorm test` tested (JSON)
SWEEP_MARKER = "SWEEP"  # a folder the sweep created: the only ones it continues
RUNNING_MARKER = "RUNNING"  # the process training in a sweep's folder (JSON: pid, host)
RUN_FILES = ("metrics.csv", DONE_MARKER, FAILED_MARKER, STOPPED_MARKER, TESTED_MARKER)
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"  # Lightning's SLURM requeue checkpoints
SUPERSEDED_METRICS = "metrics.superseded.csv"
RUN_DIR_VARIABLE = "LIT_DIVNORM_RUN_DIR"  # rank 0's run folder, for the ranks it launches


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of a (possibly distributed) launch, from the usual
    environment variables (torchrun, SLURM, Lightning's own launcher); true when none is set."""
    names = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(os.environ.get(name, "0") == "0" for name in names)


def experiment_area(config: str | Path, fallback_root: str | Path | None = None) -> str:
    """``configs/ptb/lstm/dn.yaml`` -> ``"ptb/lstm"``: the config's folder below its nearest
    ancestor named ``configs``; without one, relative to ``fallback_root`` (the folder's own
    name when that is not given)."""
    folder = Path(config).resolve().parent
    for ancestor in folder.parents:
        if ancestor.name == "configs":
            return folder.relative_to(ancestor).as_posix()
    if fallback_root is not None:
        return folder.relative_to(Path(fallback_root).resolve()).as_posix()
    return folder.name


def experiment_name(config: str | Path) -> str:
    """``configs/cifar10/dn_star.yaml`` -> ``"cifar10/dn_star"`` (area / config stem)."""
    return f"{experiment_area(config)}/{Path(config).stem}"


def versions(experiment_dir: str | Path, prefix: str = "version") -> list[Path]:
    """The ``<prefix>_<N>`` folders of one experiment, by increasing ``N``."""
    root = Path(experiment_dir)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := pattern.match(p.name))]
    return [path for _, path in sorted(found)]


def next_version(experiment_dir: str | Path, prefix: str = "version") -> Path:
    """``<experiment_dir>/<prefix>_<N + 1>`` after the highest existing ``N`` (0 if none)."""
    existing = versions(experiment_dir, prefix)
    number = int(existing[-1].name.rsplit("_", 1)[1]) + 1 if existing else 0
    return Path(experiment_dir) / f"{prefix}_{number}"


def is_run_folder(folder: Path) -> bool:
    """A fit run's folder: ``version_<N>``, or a named version that holds logs or a marker;
    not the ``<subcommand>_<N>`` logs of ``test``/``validate``/``predict``."""
    if not folder.is_dir() or EVALUATION_PATTERN.match(folder.name):
        return False
    return bool(VERSION_PATTERN.match(folder.name)) or any(
        (folder / name).is_file() for name in RUN_FILES
    )


def run_folders(experiment_dir: str | Path) -> list[Path]:
    """Every run folder of one experiment (numbered and named versions), least recently
    written first (by the time of its ``metrics.csv``, else of the folder)."""
    root = Path(experiment_dir)
    if not root.is_dir():
        return []

    def written(folder: Path) -> float:
        metrics = folder / "metrics.csv"
        return (metrics if metrics.is_file() else folder).stat().st_mtime

    return sorted(
        (p for p in root.iterdir() if is_run_folder(p)), key=lambda p: (written(p), p.name)
    )


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The resumable checkpoints of a run folder: ``checkpoints/last.ckpt`` and Lightning's
    SLURM ``hpc_ckpt_<k>.ckpt`` files, those that exist."""
    run_dir = Path(run_dir)
    found = [run_dir / LAST_CHECKPOINT] if (run_dir / LAST_CHECKPOINT).is_file() else []
    return found + sorted(run_dir.glob(HPC_CHECKPOINT_GLOB))


def latest_resumable(experiment_dir: str | Path) -> Path | None:
    """The highest ``version_<N>`` of the experiment that holds a resumable checkpoint."""
    for version in reversed(versions(experiment_dir)):
        if run_checkpoints(version):
            return version
    return None


def newest(paths: list[Path]) -> Path | None:
    """The most recently written of ``paths`` (``None`` for none)."""
    existing = [path for path in paths if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime) if existing else None


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` saved in a checkpoint, read weights-only (refusing pickled code)."""
    return int(load_checkpoint_safely(path).get("global_step", 0))


def holds_files(folder: str | Path) -> list[str]:
    """The names of the entries of ``folder`` (empty when it is missing or empty)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv``: new rows are
    appended under its header (the header widens, old rows kept, when new metrics appear)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(header)

    def _check_log_dir_exists(self) -> None:
        return None


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that never deletes: a resumed run appends to its ``metrics.csv``.

    Same arguments as Lightning's ``CSVLogger``. :meth:`supersede_from` moves the rows a killed
    run logged at or after the step a resumed run continues from into
    ``metrics.superseded.csv``, so that ``metrics.csv`` reads as one uninterrupted run.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def supersede_from(self, step: int) -> None:
        """Move the rows of ``metrics.csv`` whose ``step`` is ``>= step`` (the rows a resumed
        run logs again) to the end of ``metrics.superseded.csv``."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = list(reader.fieldnames or []), list(reader)
        later = [row for row in rows if _step_of(row) >= step]
        if not later:
            return
        superseded = path.parent / SUPERSEDED_METRICS
        new_file = not superseded.is_file()
        with superseded.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows(later)
        kept = [row for row in rows if _step_of(row) < step]
        atomic_write_text(path, _csv_text(header, kept))


def _step_of(row: dict[str, str]) -> int:
    return int(float(row.get("step") or 0))


def _csv_text(header: list[str], rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def logger_override(log_dir: Path) -> str:
    """``--trainer.logger=...``: a CSVLogger writing exactly into ``log_dir``."""
    logger = {
        "class_path": f"{RunCSVLogger.__module__}.{RunCSVLogger.__name__}",
        "init_args": {
            "save_dir": str(log_dir.parent.parent),
            "name": log_dir.parent.name,
            "version": log_dir.name,
        },
    }
    return f"--trainer.logger={json.dumps(logger)}"
