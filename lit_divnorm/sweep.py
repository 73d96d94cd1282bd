"""Run every config of a folder, K at a time, once per seed, or write a SLURM array job.

    lit-divnorm sweep configs/cifar10/ [--runs-dir runs] [-- --trainer.max_steps=100]
    lit-divnorm sweep configs/cifar10/ --seeds 0 1 2 --parallel 4 [--devices 0 1]
    lit-divnorm sweep configs/cifar10/ --seeds 0 1 2 --dry-run [--dry-run-steps 3]
    lit-divnorm sweep configs/ptb/ --slurm sweep_ptb.sh --slurm-option=--gres=gpu:1
        [--parallel K: K tasks at a time] [--slurm-env ENV] [--slurm-cpus N]
        [--slurm-time H:MM:SS | --dry-run: the time limit from the estimate]

Configs are the ``*.yaml`` files under the folder (recursively); files and folders whose name
starts with ``_`` are shared fragments, not experiments, and are skipped. Each config runs
``fit`` and then ``test`` (with the best checkpoint when its checkpoint callback monitors a
metric, otherwise with the final weights, as the paper reads accuracy at the last iteration)
and logs with a CSV logger forced to::

    <runs dir>/<area>/<config stem>/version_<N>/         without --seeds (the config's seed)
    <runs dir>/<area>/<config stem>/seed<S>_version_<N>/ with --seeds: seed_everything S

holding ``metrics.csv``, ``config.yaml``, ``checkpoints/`` and ``DONE``, where ``area`` is the
config's folder below the nearest ancestor named ``configs`` (e.g. ``cifar10``, ``ptb/lstm``,
``sr/x3``), or below the swept folder's parent otherwise: the folder ``lit-divnorm fit
--config`` logs to (:mod:`lit_divnorm.runs`). A run that ends writes ``DONE`` (JSON: the
experiment, seed, steps, schedule, test metrics, device, versions, commit, ...) and its record
``<results dir>/<area>/<config stem>/seed<S>_<id>.json`` (:mod:`lit_divnorm.results`); a run
that raises writes ``FAILED`` (the traceback) and the sweep goes on. Re-running the sweep
skips every (config, seed) that has a ``DONE`` version (writing its record if it lacks one),
continues (``--ckpt_path last``) the latest version of one that was stopped without failing
(killed, preempted: neither marker) and holds a checkpoint, and starts a new version for the
others.

Every run is its own Python process (a crash cannot take the sweep down, and Lightning's
multi-GPU launcher can re-launch that process for its other ranks); ``--parallel K`` keeps K
of them running at a time on each device (processes sharing the GPU; on the CPU each gets
``cores // K`` threads), ``--devices 0 1`` gives each process one of those CUDA devices
(``CUDA_VISIBLE_DEVICES``), and with more than one at a time each process writes its output
to ``sweep.log`` in its run folder. A line per finished run says what it measured.
``--in-process`` runs them one after another in this process instead (single process only).
``--dry-run`` trains ``--dry-run-steps`` timed steps (after ``--dry-run-warmup`` untimed ones)
of each config that would run, as many at a time as the sweep would, in temporary folders, and
prints the planned device time: the schedule's steps x the measured step time, per config and
in total (:mod:`lit_divnorm.plan`); ``--dry-run-steps 0`` only lists what would run.
Trainer/model/data overrides for every run follow ``--`` (or are given as ``--key=value``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_divnorm.checkpoint import atomic_write_text
from lit_divnorm.parallel import Job, Slot, make_slots, run_jobs
from lit_divnorm.runs import (
    DONE_MARKER,
    FAILED_MARKER,
    RUNNING_MARKER,
    SWEEP_MARKER,
    RunCSVLogger,
    checkpoint_step,
    experiment_area,
    experiment_name,
    is_rank_zero,
    newest,
    next_version,
    run_checkpoints,
)
from lit_divnorm.stopping import (
    STOPPED_MARKER,
    RunStopped,
    install_stop_handlers,
    signal_name,
    stop_requested,
    write_stopped_marker,
)

LOCAL_RECORD = "record.json"  # the record of a run that is no row of its config
SWEEP_LOG = "sweep.log"  # a run's output when several run at a time
MAX_SEED = 2**32 - 1  # seed_everything's range


@dataclass
class SweepRun:
    """One (config, seed) of a sweep: where it logs and what became of it.

    ``status``: ``"done"``, ``"failed"``, ``"skipped"`` (an earlier version finished) or
    ``"planned"`` (dry run); ``resume``: ``log_dir`` is a stopped run that this one continues;
    ``seed``: the ``--seeds`` value it runs with (``None``: the config's own);
    ``planned_steps`` / ``step_seconds``: what a dry run measured (steps still to run).
    """

    config: Path
    area: str
    log_dir: Path
    status: str
    resume: bool = False
    seed: int | None = None
    planned_steps: int | None = None
    step_seconds: float | None = None

    @property
    def experiment(self) -> str:
        """``"<area>/<config stem>"``."""
        return f"{self.area}/{self.config.stem}"

    @property
    def label(self) -> str:
        return self.experiment + ("" if self.seed is None else f" seed {self.seed}")


def version_prefix(seed: int | None) -> str:
    """The run folder prefix: ``version`` (the config's seed) or ``seed<S>_version``."""
    return "version" if seed is None else f"seed{seed}_version"


def check_seeds(seeds: list[int] | tuple | None) -> list[int] | None:
    """``seeds`` if they are distinct ints in ``[0, 2**32 - 1]`` (or ``None``), else
    ``ValueError``."""
    if seeds is None:
        return None
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)]
    bad += [s for s in seeds if isinstance(s, int) and not 0 <= s <= MAX_SEED]
    if not seeds or bad:
        raise ValueError(f"seeds must be ints from 0 to {MAX_SEED}, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must not repeat, got {seeds}")
    return seeds


def find_configs(config_dir: str | Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` below ``config_dir`` whose path has no ``_``-prefixed part."""
    root = Path(config_dir)
    if not root.is_dir():
        raise ValueError(f"config_dir must be an existing folder, got {str(config_dir)!r}")
    configs = [
        path
        for path in sorted(root.rglob("*"))
        if path.suffix in (".yaml", ".yml")
        and path.is_file()
        and not any(part.startswith("_") for part in path.relative_to(root).parts)
    ]
    if not configs:
        raise ValueError(f"config_dir {str(config_dir)!r} holds no experiment config (*.yaml)")
    return configs


def area_of(config: Path, config_dir: Path) -> str:
    """``configs/ptb/lstm/dn.yaml`` -> ``"ptb/lstm"``; without a ``configs`` ancestor, the
    config's folder relative to the parent of the swept folder."""
    return experiment_area(config, Path(config_dir).resolve().parent)


def owned(run_dir: Path) -> bool:
    """Whether the sweep made ``run_dir``: its ``SWEEP`` marker (or the ``DONE`` only the
    sweep writes). A user's own ``fit`` folder is never continued or counted by a sweep."""
    return (run_dir / SWEEP_MARKER).is_file() or (run_dir / DONE_MARKER).is_file()


def sweep_versions(run_root: Path, prefix: str = "version") -> list[Path]:
    """The folders the sweep made for one (config, seed), oldest first: ``<prefix>_<N>`` and
    the SLURM tasks' ``<prefix>_slurm<job>_<task>``."""
    if not Path(run_root).is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+|slurm\d+_\d+)$")
    found = [p for p in Path(run_root).iterdir() if pattern.match(p.name) and owned(p)]

    def made(folder: Path) -> float:
        marker = folder / SWEEP_MARKER
        return (marker if marker.is_file() else folder).stat().st_mtime

    return sorted(found, key=lambda folder: (made(folder), folder.name))


def finished_version(run_root: Path, prefix: str = "version") -> Path | None:
    """The latest folder of the sweep with a ``DONE`` marker, or ``None``."""
    done = [v for v in sweep_versions(run_root, prefix) if (v / DONE_MARKER).is_file()]
    return done[-1] if done else None


def stopped_version(run_root: Path, prefix: str = "version") -> Path | None:
    """The latest folder the sweep made if it was stopped without failing (no ``DONE``, no
    ``FAILED``) and holds a checkpoint to continue from, else ``None``."""
    found = sweep_versions(run_root, prefix)
    if not found:
        return None
    latest = found[-1]
    markers = (latest / DONE_MARKER).is_file() or (latest / FAILED_MARKER).is_file()
    return latest if not markers and run_checkpoints(latest) else None


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


def seed_override(seed: int | None) -> list[str]:
    """``["--seed_everything=S"]`` (nothing for ``None``: the config's own seed)."""
    return [] if seed is None else [f"--seed_everything={seed}"]


def _metrics_of(trainer: Any) -> dict[str, float]:
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def _schedule_of(config: Path, steps_per_epoch: int | None) -> int | None:
    """Steps of ``config``'s own schedule (without the sweep's overrides); ``None`` when the
    config cannot be resolved alone (e.g. it needs an override to parse)."""
    from lit_divnorm.results import resolved_config, schedule_steps

    try:
        return schedule_steps(resolved_config(config)["trainer"], steps_per_epoch)
    except ValueError:
        return None


def run_one(
    config: str | Path,
    log_dir: str | Path,
    overrides: list[str] | tuple = (),
    *,
    experiment: str | None = None,
    results_dir: str | Path | None = None,
    partial: bool = False,
) -> dict:
    """Fit then test one config in this process, logging into ``log_dir``.

    Fits with ``--ckpt_path last``: a ``log_dir`` holding a checkpoint of a stopped run is
    continued. Writes ``log_dir/DONE`` (JSON summary, also returned: the experiment, seed,
    steps and the config's own schedule, test metrics, the test/val curves logged during
    training, wall time, device, threads, package versions, git commit, the command) when
    both end normally, and with ``results_dir`` the run's record there when it is a row of
    its config (:func:`lit_divnorm.results.row_problem`; ``partial`` admits a run stopped
    early on purpose), else in ``log_dir/record.json`` with a line saying why;
    ``log_dir/FAILED`` (the traceback) when anything raises, except a stop by a signal
    (``STOPPED``, :mod:`lit_divnorm.stopping`: the run can be continued); the exception
    propagates. Under a distributed launch only rank 0 writes.
    """
    config, log_dir = Path(config), Path(log_dir)
    experiment = experiment or experiment_name(config)
    log_dir.mkdir(parents=True, exist_ok=True)
    running = log_dir / RUNNING_MARKER
    if is_rank_zero():
        if not (log_dir / SWEEP_MARKER).is_file():
            made = {"config": str(config.resolve()), "overrides": list(overrides)}
            atomic_write_text(log_dir / SWEEP_MARKER, json.dumps({**made, "time": time.time()}))
        here = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        atomic_write_text(running, json.dumps(here) + "\n")
    try:
        return _fit_and_test(config, log_dir, overrides, experiment, results_dir, partial)
    finally:
        if is_rank_zero():
            running.unlink(missing_ok=True)


def _fit_and_test(
    config: Path,
    log_dir: Path,
    overrides: list[str] | tuple,
    experiment: str,
    results_dir: str | Path | None,
    partial: bool,
) -> dict:
    """The body of :func:`run_one`."""
    from lit_divnorm.cli import run_cli
    from lit_divnorm.results import curves_of, environment_facts, metric_of, read_metric_rows

    started = time.time()
    try:
        args = ["fit", "--config", str(config), *overrides, logger_override(log_dir)]
        args += ["--ckpt_path", "last"]
        cli = run_cli(args)
        trainer = cli.trainer
        if trainer.interrupted:
            raise RuntimeError(f"training of {config} was interrupted")
        fit_metrics = _metrics_of(trainer)
        curves = curves_of(read_metric_rows(log_dir / "metrics.csv"), metric_of(experiment))
        per_epoch = trainer.num_training_batches
        per_epoch = int(per_epoch) if per_epoch not in (None, float("inf")) else None
        callback = trainer.checkpoint_callback
        use_best = bool(callback and callback.monitor and callback.best_model_path)
        ckpt_path = "best" if use_best else None
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        seed = cli.config["fit"].get("seed_everything")
        summary = {
            "experiment": experiment,
            "config": str(config.resolve()),
            "overrides": list(overrides),
            "command": shlex.join(["lit-divnorm", "fit", "--config", str(config), *overrides]),
            "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            "global_step": int(trainer.global_step),
            "steps_per_epoch": per_epoch,
            "schedule_steps": _schedule_of(config, per_epoch),
            "resumed_from_step": cli._last[1] if cli._last else 0,
            "tested_weights": "best checkpoint" if use_best else "final",
            "minutes": round((time.time() - started) / 60.0, 3),
            "wall_time_s": round(time.time() - started, 1),
            "fit_metrics": fit_metrics,
            "test_metrics": _metrics_of(trainer),
            "curves": curves,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "world_size": int(trainer.world_size),
            "per_device_batch": getattr(cli.datamodule, "batch_size", None),
            **environment_facts(trainer.strategy.root_device),
        }
    except RunStopped:
        raise  # STOPPED, with last.ckpt at the step it stopped
    except BaseException as error:
        signum = _stop_signal_of(error)
        if signum is None:
            if is_rank_zero():
                (log_dir / FAILED_MARKER).write_text(traceback.format_exc())
            raise
        # stopped before a training step ended (setup, data, evaluation): the checkpoints
        # it has are the run's; it is continued, not failed
        if is_rank_zero():
            write_stopped_marker(log_dir, signum, _saved_step(log_dir))
        raise RunStopped(signum, _saved_step(log_dir), log_dir) from error
    if trainer.is_global_zero:
        (log_dir / DONE_MARKER).write_text(json.dumps(summary, indent=2))
        if results_dir is not None:
            try:  # the run is done either way; the next sweep writes a missing record
                file_record(log_dir, experiment, config, results_dir, partial)
            except (OSError, ValueError) as error:
                print(f"[sweep] could not record {log_dir}: {error}", flush=True)
    return summary


def file_record(
    log_dir: Path,
    experiment: str,
    config: Path,
    results_dir: str | Path,
    partial: bool = False,
) -> Path:
    """Write the record of the finished run ``log_dir``: into ``results_dir`` when it is a row
    of ``config`` (:func:`~lit_divnorm.results.row_problem`), else beside the run as
    ``log_dir/record.json``, saying why on one line; returns where it went."""
    from lit_divnorm.results import build_record, resolved_config, row_problem, write_record

    record = build_record(log_dir, experiment)
    try:
        problem = row_problem(record, resolved_config(config), partial)
    except ValueError as error:
        problem = f"its config could not be resolved alone ({error})"
    if problem is None:
        (log_dir / LOCAL_RECORD).unlink(missing_ok=True)  # of an earlier, shorter part
        path = write_record(record, results_dir)
        print(f"[sweep] recorded {path}", flush=True)
        return path
    path = log_dir / LOCAL_RECORD
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(
        f"[sweep] not recorded in {results_dir}: {problem}; the record stays in {path} "
        f"(lit-divnorm report {log_dir.parent.parent.parent} shows it)",
        flush=True,
    )
    return path


def _stop_signal_of(error: BaseException) -> int | None:
    """The signal that ended a run with ``error``: Lightning's SIGTERM exit, a
    KeyboardInterrupt, or any exit while a stop request is pending; ``None`` for an error."""
    if isinstance(error, SIGTERMException):
        return stop_requested() or signal.SIGTERM
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(error, SystemExit):
        return stop_requested()
    return None


def _saved_step(log_dir: Path) -> int:
    """The step of the newest checkpoint of ``log_dir`` (0 without one)."""
    latest = newest(run_checkpoints(log_dir))
    return checkpoint_step(latest) if latest is not None else 0


def plan(
    config_dir: str | Path,
    runs_dir: str | Path,
    only: str | Path | list[str | Path] | None = None,
    seeds: list[int] | tuple | None = None,
) -> list[SweepRun]:
    """What a sweep would do: one :class:`SweepRun` per config (of ``only``, one config or a
    list, when given) and seed (``None``: the config's own seed), ``skipped`` or ``planned``."""
    config_dir, runs_dir = Path(config_dir), Path(runs_dir)
    seeds = check_seeds(seeds)
    chosen = None
    if only is not None:
        chosen = [Path(path) for path in ([only] if isinstance(only, (str, Path)) else only)]
        known = {config.resolve() for config in find_configs(config_dir)}
        unknown = [str(path) for path in chosen if path.resolve() not in known]
        if unknown:
            raise ValueError(f"only must name configs of {str(config_dir)!r}, got {unknown}")
        chosen = {path.resolve() for path in chosen}
    runs = []
    for config in find_configs(config_dir):
        if chosen is not None and config.resolve() not in chosen:
            continue
        area = area_of(config, config_dir)
        run_root = runs_dir / area / config.stem
        for seed in seeds or [None]:
            prefix = version_prefix(seed)
            done = finished_version(run_root, prefix)
            stopped = stopped_version(run_root, prefix)
            if done is not None:
                runs.append(SweepRun(config, area, done, "skipped", seed=seed))
            elif stopped is not None:
                runs.append(SweepRun(config, area, stopped, "planned", resume=True, seed=seed))
            else:
                log_dir = next_version(run_root, prefix)
                runs.append(SweepRun(config, area, log_dir, "planned", seed=seed))
    return runs


def _finished_line(run: SweepRun, count: str) -> str:
    """``[sweep] [2/6] done cifar10/dn_star seed 0: test/acc 0.8077, 6 steps, 0.2 min (dir)``."""
    if run.status == "stopped":
        stopped = json.loads((run.log_dir / STOPPED_MARKER).read_text())
        return (
            f"[sweep] [{count}] STOPPED {run.label} by {stopped['signal']} at step "
            f"{stopped['step']} (last.ckpt kept; the same sweep continues it)"
        )
    if run.status != "done":
        why = run.log_dir / FAILED_MARKER
        return f"[sweep] [{count}] FAILED {run.label} (" + (
            f"see {why})" if why.is_file() else "no FAILED marker: the process ended early)"
        )
    from lit_divnorm.results import metric_of

    summary = json.loads((run.log_dir / DONE_MARKER).read_text())
    metric = metric_of(run.experiment)
    tests = summary.get("test_metrics", {})
    shown = {metric: tests[metric]} if metric in tests else tests
    figures = ", ".join(f"{key} {value:.4g}" for key, value in sorted(shown.items()))
    return (
        f"[sweep] [{count}] done {run.label}: {figures or 'no test metric'}, "
        f"{summary.get('global_step')} steps, {summary.get('minutes')} min ({run.log_dir})"
    )


def _record_finished(run: SweepRun, results_dir: str | Path | None, partial: bool) -> None:
    """Write the record of a finished run that lacks one (finished before ``--results-dir``
    was given, or its writing failed); a run without the fields of a record is left out."""
    if results_dir is None:
        return
    from lit_divnorm.results import build_record, record_path

    try:
        record = build_record(run.log_dir, run.experiment)
    except ValueError as error:
        print(f"[sweep] no record for {run.label}: {error}", flush=True)
        return
    if not record_path(record, results_dir).is_file():
        file_record(run.log_dir, run.experiment, run.config, results_dir, partial)


def _check_overrides(overrides: list[str] | tuple, seeds: list[int] | None) -> None:
    if seeds is not None and any(o.startswith("--seed_everything") for o in overrides):
        raise ValueError(
            "give the seeds with --seeds, not --seed_everything in the overrides "
            f"(got {[o for o in overrides if o.startswith('--seed_everything')]})"
        )


def sweep(
    config_dir: str | Path,
    runs_dir: str | Path = "runs",
    overrides: list[str] | tuple = (),
    *,
    seeds: list[int] | tuple | None = None,
    parallel: int = 1,
    devices: list[str] | tuple | None = None,
    threads: int | None = None,
    in_process: bool = False,
    dry_run: bool = False,
    dry_run_steps: int = 3,
    dry_run_warmup: int = 2,
    only: str | Path | list[str | Path] | None = None,
    results_dir: str | Path | None = "results",
    partial: bool = False,
) -> list[SweepRun]:
    """Run every (config, seed) of ``config_dir`` that has not finished yet, ``parallel`` at
    a time per device (see the module docstring); returns them with their status. Records go
    to ``results_dir`` only for runs of each config's own settings and schedule (``partial``
    also admits runs stopped early by an override); the others stay in their run folder."""
    seeds = check_seeds(seeds)
    _check_overrides(overrides, seeds)
    slots = make_slots(parallel, devices, threads=threads)
    if in_process and (len(slots) > 1 or devices):
        raise ValueError(
            "in_process runs one run at a time in this process, on its own device: got "
            f"parallel={parallel}, devices={devices}"
        )
    _check_devices(devices)
    runs = plan(config_dir, runs_dir, only, seeds)
    todo = []
    for run in runs:
        if run.status == "skipped":
            print(f"[sweep] skip {run.label} (finished: {run.log_dir})", flush=True)
            if not dry_run:
                _record_finished(run, results_dir, partial)
        else:
            verb = "continue" if run.resume else "run"
            print(f"[sweep] {'would ' if dry_run else ''}{verb} {run.label} -> {run.log_dir}")
            todo.append(run)
    sys.stdout.flush()
    if dry_run:
        if dry_run_steps > 0 and todo:
            print_plan(
                todo,
                time_runs(todo, overrides, slots, in_process, dry_run_steps, dry_run_warmup),
                slots,
            )
        return runs
    if in_process:
        install_stop_handlers()
        for number, run in enumerate(todo, 1):
            if stop_requested() is not None:
                run.status = "not started"
                continue
            try:
                run_one(
                    run.config,
                    run.log_dir,
                    [*overrides, *seed_override(run.seed)],
                    experiment=run.experiment,
                    results_dir=results_dir,
                    partial=partial,
                )
                run.status = "done"
            except RunStopped:
                run.status = "stopped"
            except Exception as error:  # a failing run must not stop the others
                print(f"[sweep] {run.label}: {type(error).__name__}: {error}", flush=True)
                run.status = "failed"
            print(_finished_line(run, f"{number}/{len(todo)}"), flush=True)
        return runs
    _run_as_processes(todo, overrides, slots, results_dir, partial)
    return runs


def _check_devices(devices: list[str] | tuple | None) -> None:
    """Refuse device indices this machine does not have (when it has CUDA devices)."""
    if not devices:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [d for d in devices if count and int(d) >= count]
    if missing:
        raise ValueError(
            f"devices must be CUDA device indices below {count} on this machine, got {missing}"
        )
    if not count:
        print(
            "[sweep] no CUDA device is visible here; each run still gets its CUDA_VISIBLE_DEVICES",
            flush=True,
        )


def _run_as_processes(
    todo: list[SweepRun],
    overrides: list[str] | tuple,
    slots: list[Slot],
    results_dir: Any,
    partial: bool,
) -> None:
    finished = 0

    def command(run: SweepRun) -> list[str]:
        command = [sys.executable, "-m", "lit_divnorm.sweep", "--run-one", str(run.config)]
        command += ["--log-dir", str(run.log_dir), "--experiment", run.experiment]
        if results_dir is not None:
            command += ["--results-dir", str(results_dir)]
        command += ["--partial"] if partial else []
        return [*command, "--", *overrides, *seed_override(run.seed)]

    def job(run: SweepRun) -> Job:
        def on_start(slot: Slot) -> None:
            where = f" (output: {run.log_dir / SWEEP_LOG})" if len(slots) > 1 else ""
            print(f"[sweep] start {run.label} on {slot.describe()}{where}", flush=True)

        def on_exit(code: int, slot: Slot) -> None:
            nonlocal finished
            finished += 1
            done = code == 0 and (run.log_dir / DONE_MARKER).is_file()
            stopped = not done and (run.log_dir / STOPPED_MARKER).is_file()
            run.status = "done" if done else "stopped" if stopped else "failed"
            line = _finished_line(run, f"{finished}/{len(todo)}")
            print(line + ("" if done else f" (exit code {code})"), flush=True)

        log_file = run.log_dir / SWEEP_LOG if len(slots) > 1 else None
        return Job(command(run), on_exit, log_file=log_file, on_start=on_start)

    jobs = [job(run) for run in todo]
    install_stop_handlers()
    never = run_jobs(jobs, slots, stop_requested=stop_requested)
    for run, job_ in zip(todo, jobs):
        if any(job_ is other for other in never):
            run.status = "not started"


def time_runs(
    todo: list[SweepRun],
    overrides: list[str] | tuple,
    slots: list[Slot],
    in_process: bool,
    steps: int,
    warmup: int,
) -> dict[Path, Any]:
    """Time each config of ``todo`` once (:func:`lit_divnorm.plan.time_configs`), in this
    process or in processes ``len(slots)`` at a time; ``{config: ConfigTiming}``."""
    from lit_divnorm.plan import time_configs

    configs = list(dict.fromkeys(run.config for run in todo))
    jobs = [(config, list(overrides)) for config in configs]
    timings = time_configs(jobs, None if in_process else slots, steps, warmup)
    return dict(zip(configs, timings))


def print_plan(todo: list[SweepRun], timings: dict[Path, Any], slots: list[Slot]) -> None:
    """The planned device time: per config the runs, steps still to run (the schedule, less
    a stopped run's checkpoint step), the step time and their product; then the total."""
    from lit_divnorm.plan import format_hours

    timing = next(iter(timings.values()))
    print(
        f"[sweep] planned device time from {len(timing.intervals) or '?'} timed steps per "
        f"config, {len(slots)} run(s) at a time ({timing.threads} CPU threads each):"
    )
    header = f"  {'experiment':<32} {'runs':>4} {'steps':>10} {'ms/step':>9} {'time':>10}"
    print(header)
    total = 0.0
    unknown = []
    for config, measured in timings.items():
        runs = [run for run in todo if run.config == config]
        steps = 0
        for run in runs:
            run.step_seconds = measured.step_seconds
            if measured.schedule_steps is None:
                continue
            done = 0
            if run.resume:
                latest = newest(run_checkpoints(run.log_dir))
                done = checkpoint_step(latest) if latest is not None else 0
            run.planned_steps = max(0, measured.schedule_steps - done)
            steps += run.planned_steps
        name = runs[0].experiment
        if measured.step_seconds is None or measured.schedule_steps is None:
            unknown.append(name)
            why = measured.error or "the schedule has no end (max_steps and max_epochs unset)"
            print(f"  {name:<32} {len(runs):>4}   not timed: {why.splitlines()[0][:200]}")
            continue
        hours = steps * measured.step_seconds / 3600.0
        total += hours
        print(
            f"  {name:<32} {len(runs):>4} {steps:>10} {measured.step_seconds * 1e3:>9.1f} "
            f"{format_hours(hours):>10}"
        )
    wall = total / len(slots)
    print(
        f"[sweep] total: {format_hours(total)} of run time"
        + (
            f", about {format_hours(wall)} of wall time at {len(slots)} at a time"
            if len(slots) > 1
            else ""
        )
        + (f"; not timed: {', '.join(unknown)}" if unknown else "")
        + " (training steps only; evaluation not included)",
        flush=True,
    )


def slurm_script(
    config_dir: str | Path,
    runs_dir: str | Path = "runs",
    overrides: list[str] | tuple = (),
    *,
    options: list[str] | tuple = (),
    job_name: str = "lit-divnorm-sweep",
    seeds: list[int] | tuple | None = None,
    results_dir: str | Path | None = "results",
    throttle: int | None = None,
    cpus_per_task: int = 4,
    time_limit: str | None = None,
    environment: str | None = None,
    partial: bool = False,
) -> str:
    """A SLURM array job running one (config, seed) of ``config_dir`` per array task.

    The job survives its time limit: ``--signal=SIGUSR1@120`` asks each run to save
    ``last.ckpt`` at its step and requeue the task (:mod:`lit_divnorm.stopping`), and
    ``--requeue`` lets SLURM run it again, when it continues its own folder. Each task first
    asks ``python -m lit_divnorm.sweep DIR --only CONFIG [--seeds S] --next-log-dir`` for its
    folder: the sweep's stopped folder of that (config, seed) if there is one, else a new
    ``<version prefix>_slurm<array job>_<task>`` (nothing when the run already finished: the
    task ends), then runs ``srun python -m lit_divnorm.sweep --run-one CONFIG --log-dir DIR``,
    so every rank of a multi-GPU task logs into the same folder, and the run's record goes to
    ``results_dir``.

    ``throttle``: tasks at a time (``--array=0-N%K``); ``cpus_per_task``: CPU cores of a task
    (also its ``OMP_NUM_THREADS``); ``time_limit``: ``--time`` (``H:MM:SS``, e.g. from a dry
    run's estimate); ``environment``: a virtual environment folder (``source
    DIR/bin/activate``) or a conda environment name (``conda activate NAME``) to activate
    first, then its ``python`` runs (else this interpreter); ``options``: extra ``#SBATCH``
    options, e.g. ``["--gres=gpu:1"]``.
    """
    seeds = check_seeds(seeds)
    _check_overrides(overrides, seeds)
    for name, value in (("throttle", throttle), ("cpus_per_task", cpus_per_task)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if time_limit is not None and not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", time_limit):
        raise ValueError(f"time_limit must be SLURM's [D-]H[:MM[:SS]], got {time_limit!r}")
    configs = [path.resolve() for path in find_configs(config_dir)]
    runs_dir = Path(runs_dir).resolve()
    python = shlex.quote(sys.executable) if environment is None else "python"
    seed_count = len(seeds) if seeds else 1
    record = (
        []
        if results_dir is None
        else ["--results-dir", shlex.quote(str(Path(results_dir).resolve()))]
    )
    record += ["--partial"] if partial else []
    array = f"0-{len(configs) * seed_count - 1}" + (f"%{throttle}" if throttle else "")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={runs_dir}/slurm/%A_%a.out",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        "#SBATCH --signal=SIGUSR1@120",
        "#SBATCH --requeue",
        *([f"#SBATCH --time={time_limit}"] if time_limit else []),
        *(f"#SBATCH {option}" for option in options),
        "set -euo pipefail",
        *_activation(environment),
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        f"mkdir -p {shlex.quote(str(runs_dir / 'slurm'))}",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "CONFIGS=(",
        *(f"  {shlex.quote(str(config))}" for config in configs),
        ")",
        "SEEDS=(" + (" ".join(str(seed) for seed in seeds) if seeds else '""') + ")",
        'CONFIG="${CONFIGS[$((SLURM_ARRAY_TASK_ID / ${#SEEDS[@]}))]}"',
        'SEED="${SEEDS[$((SLURM_ARRAY_TASK_ID % ${#SEEDS[@]}))]}"',
        "SEED_ARGS=(); RUN_SEED=()",
        'if [ -n "$SEED" ]; then SEED_ARGS=(--seeds "$SEED"); '
        'RUN_SEED=("--seed_everything=$SEED"); fi',
        'VERSION="slurm${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-0}}_${SLURM_ARRAY_TASK_ID}"',
        " ".join(
            [
                "LOG_DIR=$(" + python,
                "-m lit_divnorm.sweep",
                shlex.quote(str(Path(config_dir).resolve())),
                "--runs-dir",
                shlex.quote(str(runs_dir)),
                '--only "$CONFIG" "${SEED_ARGS[@]}" --next-log-dir --version-name "$VERSION")',
            ]
        ),
        'if [ -z "$LOG_DIR" ]; then echo "$CONFIG ${SEED:+seed $SEED }already finished"; '
        "exit 0; fi",
        " ".join(
            [
                "srun",
                python,
                '-m lit_divnorm.sweep --run-one "$CONFIG"',
                *record,
                '--log-dir "$LOG_DIR" --',
                *(shlex.quote(o) for o in overrides),
                '"${RUN_SEED[@]}"',
            ]
        ),
    ]
    return "\n".join(lines) + "\n"


def _activation(environment: str | None) -> list[str]:
    """The lines that activate ``environment`` (a venv folder or a conda env name)."""
    if environment is None:
        return []
    folder = Path(environment).expanduser()
    if (folder / "bin" / "activate").is_file():
        return [f"source {shlex.quote(str(folder.resolve() / 'bin' / 'activate'))}"]
    if "/" in environment:
        raise ValueError(
            f"environment {environment!r} is neither a virtual environment folder (no "
            "bin/activate) nor a conda environment name"
        )
    return ['eval "$(conda shell.bash hook)"', f"conda activate {shlex.quote(environment)}"]


def slurm_time_limit(runs: list[SweepRun], margin: float = 1.5) -> str | None:
    """``--time`` for the longest of ``runs`` that a dry run timed: its planned steps x step
    time x ``margin`` plus 15 minutes (start, evaluation), as ``H:MM:SS``; ``None`` when none
    was timed. A task that runs out of time checkpoints and requeues anyway."""
    seconds = [
        run.planned_steps * run.step_seconds
        for run in runs
        if run.planned_steps is not None and run.step_seconds is not None
    ]
    if not seconds:
        return None
    total = int(max(seconds) * margin + 15 * 60)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-divnorm sweep",
        description="Run every config of a folder (fit + test), or write a SLURM array job.",
        epilog="Overrides for every run follow '--', e.g. -- --trainer.max_steps=100.",
    )
    parser.add_argument("config_dir", nargs="?", help="folder of experiment configs")
    parser.add_argument("--runs-dir", default="runs", help="root of the run folders (runs)")
    parser.add_argument(
        "--results-dir",
        default="results",
        help="where each finished run's record goes (results); 'none' writes none",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="record runs stopped early by an override (--trainer.max_steps=N) in the results "
        "folder as partial rows; without it only runs of a config's own schedule go there",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", metavar="S", help="run each config once per seed"
    )
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="K", help="runs at a time per device (1)"
    )
    parser.add_argument(
        "--devices", nargs="+", metavar="D", help="CUDA devices to spread the runs over"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads per run (default: the cores divided by the runs at a time)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="time a few steps per config, print the plan"
    )
    parser.add_argument(
        "--dry-run-steps", type=int, default=3, metavar="N", help="timed steps per config (3)"
    )
    parser.add_argument(
        "--dry-run-warmup", type=int, default=2, metavar="N", help="untimed first steps (2)"
    )
    parser.add_argument("--slurm", metavar="FILE", help="write a SLURM array job script instead")
    parser.add_argument(
        "--slurm-option", action="append", default=[], help="extra #SBATCH option (repeatable)"
    )
    parser.add_argument(
        "--slurm-env",
        metavar="ENV",
        help="virtual environment folder or conda environment name the job activates",
    )
    parser.add_argument(
        "--slurm-time",
        metavar="H:MM:SS",
        help="each task's --time (default with --dry-run: 1.5 x the longest estimate + 15 min)",
    )
    parser.add_argument(
        "--slurm-cpus", type=int, default=4, metavar="N", help="--cpus-per-task of a task (4)"
    )
    parser.add_argument("--version-name", help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help="run configs in this process")
    parser.add_argument(
        "--only", nargs="+", metavar="CONFIG", help="run only these configs of the folder"
    )
    parser.add_argument(
        "--next-log-dir",
        action="store_true",
        help="print the folder the next run of --only would log to (nothing if it finished)",
    )
    parser.add_argument("--run-one", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help=argparse.SUPPRESS)
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` at ``--``: (sweep options, overrides passed to every run)."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> list[SweepRun] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, overrides = split_overrides(argv)
    parser = _parser()
    options, unknown = parser.parse_known_args(own)
    bad = [arg for arg in unknown if not (arg.startswith("--") and "=" in arg)]
    if bad:
        parser.error(f"overrides must be --key=value or follow '--', got {bad}")
    overrides = [*unknown, *overrides]
    results_dir = None if options.results_dir.lower() == "none" else options.results_dir
    if options.run_one:
        if not options.log_dir:
            parser.error("--run-one needs --log-dir")
        install_stop_handlers()
        try:
            run_one(
                options.run_one,
                options.log_dir,
                overrides,
                experiment=options.experiment,
                results_dir=results_dir,
                partial=options.partial,
            )
        except RunStopped as stopped:
            print(f"[sweep] {stopped}", flush=True)
            sys.exit(stopped.exit_code)
        return None
    if not options.config_dir:
        parser.error("the config folder (CONFIG_DIR) is required")
    if options.dry_run_steps < 0 or options.dry_run_warmup < 1:
        parser.error(
            "--dry-run-steps must be >= 0 and --dry-run-warmup >= 1, got "
            f"{options.dry_run_steps} and {options.dry_run_warmup}"
        )
    try:
        if options.next_log_dir:
            if not options.only:
                parser.error("--next-log-dir needs --only CONFIG")
            if len(options.only) > 1 or (options.seeds and len(options.seeds) > 1):
                parser.error("--next-log-dir takes one config and at most one seed")
            (run,) = plan(options.config_dir, options.runs_dir, options.only, options.seeds)
            if run.status == "planned":
                log_dir = run.log_dir
                if options.version_name and not run.resume:
                    name = f"{version_prefix(run.seed)}_{options.version_name}"
                    log_dir = log_dir.parent / name
                print(log_dir.resolve())
            return None
        if options.slurm:
            if options.devices or options.in_process:
                parser.error(
                    "--slurm runs one run per array task: leave out --devices/--in-process"
                )
            time_limit = options.slurm_time
            if options.dry_run and time_limit is None:
                timed = sweep(
                    options.config_dir,
                    options.runs_dir,
                    overrides,
                    seeds=options.seeds,
                    threads=options.slurm_cpus,
                    dry_run=True,
                    dry_run_steps=max(1, options.dry_run_steps),
                    dry_run_warmup=options.dry_run_warmup,
                    only=options.only,
                )
                time_limit = slurm_time_limit([r for r in timed if r.status == "planned"])
            script = slurm_script(
                options.config_dir,
                options.runs_dir,
                overrides,
                options=options.slurm_option,
                seeds=options.seeds,
                results_dir=results_dir,
                throttle=options.parallel if options.parallel > 1 else None,
                cpus_per_task=options.slurm_cpus,
                time_limit=time_limit,
                environment=options.slurm_env,
                partial=options.partial,
            )
            Path(options.slurm).write_text(script)
            (Path(options.runs_dir) / "slurm").mkdir(parents=True, exist_ok=True)  # job logs
            limit = f" (--time={time_limit})" if time_limit else ""
            print(f"[sweep] wrote {options.slurm}{limit}; submit with: sbatch {options.slurm}")
            return None
        runs = sweep(
            options.config_dir,
            options.runs_dir,
            overrides,
            seeds=options.seeds,
            parallel=options.parallel,
            devices=options.devices,
            threads=options.threads,
            in_process=options.in_process,
            dry_run=options.dry_run,
            dry_run_steps=options.dry_run_steps,
            dry_run_warmup=options.dry_run_warmup,
            only=options.only,
            results_dir=results_dir,
            partial=options.partial,
        )
    except ValueError as error:
        parser.error(str(error))
    states = ("done", "skipped", "failed", "stopped", "not started", "planned")
    counts = {state: sum(r.status == state for r in runs) for state in states}
    shown = [f"{counts[state]} {state}" for state in states[:3]]
    shown += [f"{counts[state]} {state}" for state in states[3:5] if counts[state]]
    if options.dry_run:
        shown.append(f"{counts['planned']} planned")
    print(f"[sweep] {', '.join(shown)}", flush=True)
    signum = stop_requested()
    if signum is not None:
        print(
            f"[sweep] stopped by {signal_name(signum)}: run the same command to continue",
            flush=True,
        )
        sys.exit(128 + int(signum))
    if counts["failed"] and options.only:
        sys.exit(1)
    return runs


if __name__ == "__main__":
    main()
