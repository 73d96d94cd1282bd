"""Run every config of a folder, one after another, or write a SLURM array job that does.

    lit-divnorm sweep configs/cifar10/ [--runs-dir runs] [--dry-run] [-- --trainer.max_steps=100]
    lit-divnorm sweep configs/ptb/ --slurm sweep_ptb.sh --slurm-option=--gres=gpu:1

Configs are the ``*.yaml`` files under the folder (recursively); files and folders whose name
starts with ``_`` are shared fragments, not experiments, and are skipped. Each config runs
``fit`` and then ``test`` (with the best checkpoint when its checkpoint callback monitors a
metric, otherwise with the final weights, as the paper reads accuracy at the last iteration)
and logs with a CSV logger forced to::

    <runs dir>/<area>/<config stem>/version_<N>/   metrics.csv, config.yaml, checkpoints/, DONE

where ``area`` is the config's folder below the nearest ancestor named ``configs`` (e.g.
``cifar10``, ``ptb/lstm``, ``sr/x3``), or below the swept folder's parent otherwise: the same
folder ``lit-divnorm fit --config`` logs to (:mod:`lit_divnorm.runs`). A run that ends writes
``DONE`` (JSON: config, steps, test metrics); a run that raises writes ``FAILED`` (the
traceback) and the sweep goes on. Re-running the sweep skips every config that has a ``DONE``
version, continues (``--ckpt_path last``) the latest version of a config that was stopped
without failing (killed, preempted: neither marker) and holds a checkpoint, and starts a new
version for the others.

By default every run is its own Python process (a crash cannot take the sweep down, and
Lightning's multi-GPU launcher can re-launch that process for its other ranks);
``--in-process`` runs them in this process instead (faster to start; single process only).
Trainer/model/data overrides for every run follow ``--`` (or are given as ``--key=value``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_divnorm.runs import (
    RunCSVLogger,
    experiment_area,
    is_rank_zero,
    next_version,
    run_checkpoints,
    versions,
)

DONE_MARKER = "DONE"
FAILED_MARKER = "FAILED"


@dataclass
class SweepRun:
    """One config of a sweep: where it logs and what became of it.

    ``status``: ``"done"``, ``"failed"``, ``"skipped"`` (an earlier version finished) or
    ``"planned"`` (dry run); ``resume``: ``log_dir`` is a stopped run that this one continues.
    """

    config: Path
    area: str
    log_dir: Path
    status: str
    resume: bool = False


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


def finished_version(run_root: Path) -> Path | None:
    """The latest version with a ``DONE`` marker, or ``None``."""
    done = [v for v in versions(run_root) if (v / DONE_MARKER).is_file()]
    return done[-1] if done else None


def stopped_version(run_root: Path) -> Path | None:
    """The latest version if it was stopped without failing (no ``DONE``, no ``FAILED``) and
    holds a checkpoint to continue from, else ``None``."""
    found = versions(run_root)
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


def _metrics_of(trainer: Any) -> dict[str, float]:
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def run_one(config: str | Path, log_dir: str | Path, overrides: list[str] | tuple = ()) -> dict:
    """Fit then test one config in this process, logging into ``log_dir``.

    Fits with ``--ckpt_path last``: a ``log_dir`` holding a checkpoint of a stopped run is
    continued. Writes ``log_dir/DONE`` (JSON summary, also returned) when both end normally,
    and ``log_dir/FAILED`` (the traceback) when anything raises, except a stop by SIGTERM or
    Ctrl-C (the run can be continued); the exception propagates. Under a distributed launch
    only rank 0 writes the markers.
    """
    from lit_divnorm.cli import run_cli

    config, log_dir = Path(config), Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        args = ["fit", "--config", str(config), *overrides, logger_override(log_dir)]
        args += ["--ckpt_path", "last"]
        cli = run_cli(args)
        trainer = cli.trainer
        if trainer.interrupted:
            raise RuntimeError(f"training of {config} was interrupted")
        fit_metrics = _metrics_of(trainer)
        callback = trainer.checkpoint_callback
        use_best = bool(callback and callback.monitor and callback.best_model_path)
        ckpt_path = "best" if use_best else None
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        summary = {
            "config": str(config.resolve()),
            "overrides": list(overrides),
            "global_step": int(trainer.global_step),
            "tested_weights": "best checkpoint" if use_best else "final",
            "minutes": round((time.time() - started) / 60.0, 3),
            "fit_metrics": fit_metrics,
            "test_metrics": _metrics_of(trainer),
        }
    except (SIGTERMException, KeyboardInterrupt):
        raise
    except BaseException:
        if is_rank_zero():
            (log_dir / FAILED_MARKER).write_text(traceback.format_exc())
        raise
    if trainer.is_global_zero:
        (log_dir / DONE_MARKER).write_text(json.dumps(summary, indent=2))
    return summary


def plan(config_dir: str | Path, runs_dir: str | Path, only: str | None = None) -> list[SweepRun]:
    """What a sweep would do: one :class:`SweepRun` per config, ``skipped`` or ``planned``."""
    config_dir, runs_dir = Path(config_dir), Path(runs_dir)
    runs = []
    for config in find_configs(config_dir):
        if only is not None and config.resolve() != Path(only).resolve():
            continue
        area = area_of(config, config_dir)
        run_root = runs_dir / area / config.stem
        done = finished_version(run_root)
        stopped = stopped_version(run_root)
        if done is not None:
            runs.append(SweepRun(config, area, done, "skipped"))
        elif stopped is not None:
            runs.append(SweepRun(config, area, stopped, "planned", resume=True))
        else:
            runs.append(SweepRun(config, area, next_version(run_root), "planned"))
    if only is not None and not runs:
        raise ValueError(f"only must name a config of {str(config_dir)!r}, got {only!r}")
    return runs


def sweep(
    config_dir: str | Path,
    runs_dir: str | Path = "runs",
    overrides: list[str] | tuple = (),
    *,
    in_process: bool = False,
    dry_run: bool = False,
    only: str | None = None,
) -> list[SweepRun]:
    """Run every config of ``config_dir`` that has not finished yet, one after another."""
    runs = plan(config_dir, runs_dir, only)
    for run in runs:
        if run.status == "skipped":
            print(f"[sweep] skip {run.config} (finished: {run.log_dir})", flush=True)
            continue
        verb = "continue" if run.resume else "run"
        if dry_run:
            print(f"[sweep] would {verb} {run.config} -> {run.log_dir}", flush=True)
            continue
        print(f"[sweep] {verb} {run.config} -> {run.log_dir}", flush=True)
        if in_process:
            try:
                run_one(run.config, run.log_dir, overrides)
                run.status = "done"
            except Exception as error:  # a failing run must not stop the others
                print(f"[sweep] FAILED {run.config}: {type(error).__name__}: {error}", flush=True)
                run.status = "failed"
        else:
            command = [sys.executable, "-m", "lit_divnorm.sweep", "--run-one", str(run.config)]
            command += ["--log-dir", str(run.log_dir), "--", *overrides]
            code = subprocess.run(command, check=False).returncode
            run.status = "done" if code == 0 and (run.log_dir / DONE_MARKER).is_file() else "failed"
            if run.status == "failed":
                print(f"[sweep] FAILED {run.config} (exit code {code})", flush=True)
    return runs


def slurm_script(
    config_dir: str | Path,
    runs_dir: str | Path = "runs",
    overrides: list[str] | tuple = (),
    *,
    options: list[str] | tuple = (),
    job_name: str = "lit-divnorm-sweep",
) -> str:
    """A SLURM array job running one config of ``config_dir`` per array task.

    Each task first asks ``python -m lit_divnorm.sweep DIR --only CONFIG --next-log-dir`` for
    its version folder (nothing when the config already finished: the task ends), then runs
    ``srun python -m lit_divnorm.sweep --run-one CONFIG --log-dir DIR``, so every rank of a
    multi-GPU task (``--ntasks-per-node``/``--gres`` options) logs into the same folder.
    ``options`` are extra ``#SBATCH`` options, e.g. ``["--gres=gpu:1", "--time=24:00:00"]``.
    """
    configs = [path.resolve() for path in find_configs(config_dir)]
    runs_dir = Path(runs_dir).resolve()
    python = shlex.quote(sys.executable)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{len(configs) - 1}",
        f"#SBATCH --output={runs_dir}/slurm/%A_%a.out",
        *(f"#SBATCH {option}" for option in options),
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(runs_dir / 'slurm'))}",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "CONFIGS=(",
        *(f"  {shlex.quote(str(config))}" for config in configs),
        ")",
        'CONFIG="${CONFIGS[$SLURM_ARRAY_TASK_ID]}"',
        " ".join(
            [
                "LOG_DIR=$(" + python,
                "-m lit_divnorm.sweep",
                shlex.quote(str(Path(config_dir).resolve())),
                "--runs-dir",
                shlex.quote(str(runs_dir)),
                '--only "$CONFIG" --next-log-dir)',
            ]
        ),
        'if [ -z "$LOG_DIR" ]; then echo "$CONFIG already finished"; exit 0; fi',
        " ".join(
            [
                "srun",
                python,
                '-m lit_divnorm.sweep --run-one "$CONFIG" --log-dir "$LOG_DIR" --',
                *(shlex.quote(o) for o in overrides),
            ]
        ),
    ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-divnorm sweep",
        description="Run every config of a folder (fit + test), or write a SLURM array job.",
        epilog="Overrides for every run follow '--', e.g. -- --trainer.max_steps=100.",
    )
    parser.add_argument("config_dir", nargs="?", help="folder of experiment configs")
    parser.add_argument("--runs-dir", default="runs", help="root of the run folders (runs)")
    parser.add_argument("--dry-run", action="store_true", help="only print what would run")
    parser.add_argument("--slurm", metavar="FILE", help="write a SLURM array job script instead")
    parser.add_argument(
        "--slurm-option", action="append", default=[], help="extra #SBATCH option (repeatable)"
    )
    parser.add_argument("--in-process", action="store_true", help="run configs in this process")
    parser.add_argument("--only", metavar="CONFIG", help="run only this config of the folder")
    parser.add_argument(
        "--next-log-dir",
        action="store_true",
        help="print the folder the next run of --only would log to (nothing if it finished)",
    )
    parser.add_argument("--run-one", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
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
    if options.run_one:
        if not options.log_dir:
            parser.error("--run-one needs --log-dir")
        run_one(options.run_one, options.log_dir, overrides)
        return None
    if not options.config_dir:
        parser.error("the config folder (CONFIG_DIR) is required")
    try:
        if options.next_log_dir:
            if not options.only:
                parser.error("--next-log-dir needs --only CONFIG")
            (run,) = plan(options.config_dir, options.runs_dir, options.only)
            if run.status == "planned":
                print(run.log_dir.resolve())
            return None
        if options.slurm:
            script = slurm_script(
                options.config_dir, options.runs_dir, overrides, options=options.slurm_option
            )
            Path(options.slurm).write_text(script)
            (Path(options.runs_dir) / "slurm").mkdir(parents=True, exist_ok=True)  # job logs
            print(f"[sweep] wrote {options.slurm}; submit with: sbatch {options.slurm}")
            return None
        runs = sweep(
            options.config_dir,
            options.runs_dir,
            overrides,
            in_process=options.in_process,
            dry_run=options.dry_run,
            only=options.only,
        )
    except ValueError as error:
        parser.error(str(error))
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "skipped", "planned")}
    failed = [r for r in runs if r.status == "failed"]
    summary = f"{counts['done']} done, {counts['skipped']} skipped, {len(failed)} failed"
    print(f"[sweep] {summary}" + (f", {counts['planned']} planned" if options.dry_run else ""))
    if failed and options.only:
        sys.exit(1)
    return runs


if __name__ == "__main__":
    main()
