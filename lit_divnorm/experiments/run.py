"""One run of a sweep in this process: fit then test a config in its run folder, with the
markers the sweep reads (``SWEEP``, ``RUNNING``, then ``DONE``, ``STOPPED`` or ``FAILED``) and
its record filed where it belongs (results/ for a row of its config, else the run folder).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_divnorm.checkpoint import atomic_write_text
from lit_divnorm.runs import (
    DONE_MARKER,
    FAILED_MARKER,
    RUNNING_MARKER,
    SWEEP_MARKER,
    checkpoint_step,
    experiment_name,
    is_rank_zero,
    logger_override,
    newest,
    run_checkpoints,
)
from lit_divnorm.stopping import RunStopped, stop_requested, write_stopped_marker

LOCAL_RECORD = "record.json"  # the record of a run that is no row of its config


def seed_override(seed: int | None) -> list[str]:
    """``["--seed_everything=S"]`` (nothing for ``None``: the config's own seed)."""
    return [] if seed is None else [f"--seed_everything={seed}"]


def _metrics_of(trainer: Any) -> dict[str, float]:
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def _schedule_of(config: Path, steps_per_epoch: int | None) -> int | None:
    """Steps of ``config``'s own schedule (without the sweep's overrides); ``None`` when the
    config cannot be resolved alone (e.g. it needs an override to parse)."""
    from lit_divnorm.experiments.configs import resolved_config, schedule_steps

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
    its config (:func:`lit_divnorm.experiments.records.row_problem`; ``partial`` admits a run
    stopped
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
    from lit_divnorm.experiments.metrics import curves_of, read_metric_rows
    from lit_divnorm.experiments.paper import metric_of
    from lit_divnorm.provenance import environment_facts

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
    of ``config`` (:func:`~lit_divnorm.experiments.records.row_problem`), else beside the run as
    ``log_dir/record.json``, saying why on one line; returns where it went."""
    from lit_divnorm.experiments.configs import resolved_config, row_problem
    from lit_divnorm.experiments.records import build_record, write_record

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
