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
``<results dir>/<area>/<config stem>/seed<S>_<id>.json`` (:mod:`lit_divnorm.experiments.records`);
a run
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
in total (:mod:`lit_divnorm.experiments.timing`); ``--dry-run-steps 0`` only lists what would run.
Trainer/model/data overrides for every run follow ``--`` (or are given as ``--key=value``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_divnorm.experiments.configs import (
    _check_overrides,
    area_of,
    check_seeds,
    find_configs,
)
from lit_divnorm.experiments.launch import Job, Slot, make_slots, run_jobs
from lit_divnorm.experiments.run import file_record, run_one, seed_override
from lit_divnorm.experiments.slurm import slurm_script, slurm_time_limit
from lit_divnorm.runs import (
    DONE_MARKER,
    FAILED_MARKER,
    SWEEP_MARKER,
    checkpoint_step,
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
)

SWEEP_LOG = "sweep.log"  # a run's output when several run at a time


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
    from lit_divnorm.experiments.paper import metric_of

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
    from lit_divnorm.experiments.records import build_record, record_path

    try:
        record = build_record(run.log_dir, run.experiment)
    except ValueError as error:
        print(f"[sweep] no record for {run.label}: {error}", flush=True)
        return
    if not record_path(record, results_dir).is_file():
        file_record(run.log_dir, run.experiment, run.config, results_dir, partial)


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
        command = [
            sys.executable,
            "-m",
            "lit_divnorm.experiments.sweep",
            "--run-one",
            str(run.config),
        ]
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
    """Time each config of ``todo`` once (:func:`lit_divnorm.experiments.timing.time_configs`), in
    this
    process or in processes ``len(slots)`` at a time; ``{config: ConfigTiming}``."""
    from lit_divnorm.experiments.timing import time_configs

    configs = list(dict.fromkeys(run.config for run in todo))
    jobs = [(config, list(overrides)) for config in configs]
    timings = time_configs(jobs, None if in_process else slots, steps, warmup)
    return dict(zip(configs, timings))


def print_plan(todo: list[SweepRun], timings: dict[Path, Any], slots: list[Slot]) -> None:
    """The planned device time: per config the runs, steps still to run (the schedule, less
    a stopped run's checkpoint step), the step time and their product; then the total."""
    from lit_divnorm.experiments.timing import format_hours

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
        _run_one_here(options, overrides, results_dir)
        return None
    if not options.config_dir:
        parser.error("the config folder (CONFIG_DIR) is required")
    if options.dry_run_steps < 0 or options.dry_run_warmup < 1:
        parser.error(
            "--dry-run-steps must be >= 0 and --dry-run-warmup >= 1, got "
            f"{options.dry_run_steps} and {options.dry_run_warmup}"
        )
    if options.next_log_dir and not options.only:
        parser.error("--next-log-dir needs --only CONFIG")
    if options.next_log_dir and (len(options.only) > 1 or len(options.seeds or []) > 1):
        parser.error("--next-log-dir takes one config and at most one seed")
    if options.slurm and (options.devices or options.in_process):
        parser.error("--slurm runs one run per array task: leave out --devices/--in-process")
    try:
        if options.next_log_dir:
            _print_next_log_dir(options)
            return None
        if options.slurm:
            _write_slurm_script(options, overrides, results_dir)
            return None
        runs = sweep(
            **_folder_options(options, overrides),
            parallel=options.parallel,
            devices=options.devices,
            threads=options.threads,
            in_process=options.in_process,
            dry_run=options.dry_run,
            dry_run_steps=options.dry_run_steps,
            results_dir=results_dir,
            partial=options.partial,
        )
    except ValueError as error:
        parser.error(str(error))
    _summarize(runs, options)
    return runs


def _folder_options(options: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """The :func:`sweep` arguments that say which runs: the folder, seeds, overrides."""
    return {
        "config_dir": options.config_dir,
        "runs_dir": options.runs_dir,
        "overrides": overrides,
        "seeds": options.seeds,
        "only": options.only,
        "dry_run_warmup": options.dry_run_warmup,
    }


def _run_one_here(options: argparse.Namespace, overrides: list[str], results_dir: Any) -> None:
    """``--run-one``: one run in this process; exits 128 + the signal when one stopped it."""
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


def _print_next_log_dir(options: argparse.Namespace) -> None:
    """``--next-log-dir``: the folder the next run of ``--only`` logs to (a stopped one of the
    sweep's, else a new one, named ``--version-name`` when given); nothing if it finished."""
    (run,) = plan(options.config_dir, options.runs_dir, options.only, options.seeds)
    if run.status != "planned":
        return
    log_dir = run.log_dir
    if options.version_name and not run.resume:
        log_dir = log_dir.parent / f"{version_prefix(run.seed)}_{options.version_name}"
    print(log_dir.resolve())


def _write_slurm_script(
    options: argparse.Namespace, overrides: list[str], results_dir: Any
) -> None:
    """``--slurm FILE``: the array job, its time limit from ``--slurm-time`` or a dry run."""
    time_limit = options.slurm_time
    if options.dry_run and time_limit is None:
        timed = sweep(
            **_folder_options(options, overrides),
            threads=options.slurm_cpus,
            dry_run=True,
            dry_run_steps=max(1, options.dry_run_steps),
        )
        time_limit = slurm_time_limit([run for run in timed if run.status == "planned"])
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
        only=options.only,
    )
    Path(options.slurm).write_text(script)
    (Path(options.runs_dir) / "slurm").mkdir(parents=True, exist_ok=True)  # the job logs
    limit = f" (--time={time_limit})" if time_limit else ""
    print(f"[sweep] wrote {options.slurm}{limit}; submit with: sbatch {options.slurm}")


def _summarize(runs: list[SweepRun], options: argparse.Namespace) -> None:
    """One line of counts; exits 128 + the signal when one stopped the sweep, 1 when a run
    of ``--only`` failed."""
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


if __name__ == "__main__":
    main()
