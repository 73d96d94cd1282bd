"""Where a sweep stands: each (config, seed) of a config folder and its run.

    lit-divnorm status configs/cifar10/ [--runs-dir runs] [--seeds 0 1 2]

One line per (config, seed), from the folders the sweep made
(:func:`lit_divnorm.experiments.sweep.owned`;
a user's own ``fit`` folders are not the sweep's):

    done         the run fitted and tested (``DONE``)
    running      its process is alive (``RUNNING``: pid on this host), or, on another host,
                 its metrics were written in the last 10 minutes
    stopped      stopped by a signal (``STOPPED``) or killed (a dead ``RUNNING``), with a
                 checkpoint: the next sweep continues it
    failed       it raised (``FAILED``, the error's first line)
    not started  no folder of the sweep yet

with the step it reached (its newest checkpoint, else its metrics) and its config's schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lit_divnorm.experiments.configs import (
    area_of,
    check_seeds,
    find_configs,
    resolved_config,
    schedule_steps,
)
from lit_divnorm.experiments.metrics import read_metric_rows, steps_per_epoch, training_progress
from lit_divnorm.experiments.sweep import owned, version_prefix
from lit_divnorm.runs import (
    DONE_MARKER,
    FAILED_MARKER,
    RUNNING_MARKER,
    checkpoint_step,
    newest,
    run_checkpoints,
    versions,
)
from lit_divnorm.stopping import STOPPED_MARKER

RECENT_SECONDS = 600.0  # metrics written this recently, on another host: running


@dataclass
class RunStatus:
    """One (config, seed): ``state`` (see the module docstring), the run folder (``None``
    before it starts), the step reached, the schedule's steps and a detail."""

    experiment: str
    seed: int | None
    state: str
    log_dir: Path | None
    step: int
    schedule: int | None
    detail: str = ""

    def line(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        steps = f"{self.step} of {self.schedule if self.schedule is not None else '?'} steps"
        where = f"  {self.log_dir}" if self.log_dir is not None else ""
        detail = f"  ({self.detail})" if self.detail else ""
        return f"{self.state:<12} {self.experiment + seed:<36} {steps:>22}{where}{detail}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running(log_dir: Path) -> bool:
    marker = log_dir / RUNNING_MARKER
    if not marker.is_file():
        return False
    facts = json.loads(marker.read_text())
    if facts.get("host") == socket.gethostname():
        return _alive(int(facts["pid"]))
    metrics = log_dir / "metrics.csv"
    written = metrics.stat().st_mtime if metrics.is_file() else marker.stat().st_mtime
    return time.time() - written < RECENT_SECONDS


def _step(log_dir: Path) -> int:
    latest = newest(run_checkpoints(log_dir))
    logged = training_progress(read_metric_rows(log_dir / "metrics.csv"))[0]
    return max(checkpoint_step(latest) if latest is not None else 0, logged)


def run_status(
    log_dir: Path | None, experiment: str, seed: int | None, trainer: dict | None
) -> RunStatus:
    """The :class:`RunStatus` of the sweep's latest folder ``log_dir`` of one (config, seed);
    ``trainer`` is the config's own trainer section (its schedule)."""
    if log_dir is None:
        return RunStatus(experiment, seed, "not started", None, 0, _schedule(trainer, None))
    step = _step(log_dir)
    steps, epochs = training_progress(read_metric_rows(log_dir / "metrics.csv"))
    per_epoch = steps_per_epoch(steps, epochs)
    schedule = _schedule(trainer, per_epoch)
    if (log_dir / DONE_MARKER).is_file():
        summary = json.loads((log_dir / DONE_MARKER).read_text())
        done = summary.get("global_step", step)
        return RunStatus(experiment, seed, "done", log_dir, done, schedule)
    if _running(log_dir):
        return RunStatus(experiment, seed, "running", log_dir, step, schedule)
    if (log_dir / FAILED_MARKER).is_file():
        lines = (log_dir / FAILED_MARKER).read_text().strip().splitlines()
        return RunStatus(experiment, seed, "failed", log_dir, step, schedule, lines[-1][:160])
    if (log_dir / STOPPED_MARKER).is_file():
        stopped = json.loads((log_dir / STOPPED_MARKER).read_text())
        why = f"by {stopped['signal']}; the next sweep continues it"
        return RunStatus(experiment, seed, "stopped", log_dir, step, schedule, why)
    why = "killed" + ("; the next sweep continues it" if run_checkpoints(log_dir) else "")
    return RunStatus(experiment, seed, "stopped", log_dir, step, schedule, why)


def _schedule(trainer: dict | None, per_epoch: int | None) -> int | None:
    return None if trainer is None else schedule_steps(trainer, per_epoch)


def sweep_status(
    config_dir: str | Path, runs_dir: str | Path = "runs", seeds: list[int] | None = None
) -> list[RunStatus]:
    """The :class:`RunStatus` of every (config, seed) of ``config_dir`` under ``runs_dir``."""
    seeds = check_seeds(seeds)
    found = []
    for config in find_configs(config_dir):
        area = area_of(config, Path(config_dir))
        try:
            trainer = resolved_config(config)["trainer"]
        except ValueError:
            trainer = None
        for seed in seeds or [None]:
            run_root = Path(runs_dir) / area / config.stem
            mine = [v for v in versions(run_root, version_prefix(seed)) if owned(v)]
            latest = mine[-1] if mine else None
            found.append(run_status(latest, f"{area}/{config.stem}", seed, trainer))
    return found


def main(argv: list[str] | None = None) -> list[RunStatus]:
    parser = argparse.ArgumentParser(
        prog="lit-divnorm status",
        description="Each (config, seed) of a sweep: done, running, stopped, failed or not "
        "started, with its step and schedule.",
    )
    parser.add_argument("config_dir", help="the folder of experiment configs the sweep ran")
    parser.add_argument("--runs-dir", default="runs", help="root of the run folders (runs)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S", help="the sweep's seeds")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        statuses = sweep_status(options.config_dir, options.runs_dir, options.seeds)
    except ValueError as error:
        parser.error(str(error))
    for status in statuses:
        print(status.line())
    counts = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    print("[status] " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return statuses


if __name__ == "__main__":
    main()
