"""A sweep as a SLURM array job that survives its time limit (one (config, seed) per task)."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lit_divnorm.experiments.configs import _check_overrides, check_seeds, find_configs


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
    only: list[str | Path] | None = None,
) -> str:
    """A SLURM array job running one (config, seed) of ``config_dir`` per array task.

    The job survives its time limit: ``--signal=SIGUSR1@120`` asks each run to save
    ``last.ckpt`` at its step and requeue the task (:mod:`lit_divnorm.stopping`), and
    ``--requeue`` lets SLURM run it again, when it continues its own folder. Each task first
    asks ``python -m lit_divnorm.experiments.sweep DIR --only CONFIG [--seeds S] --next-log-dir``
    for its
    folder: the sweep's stopped folder of that (config, seed) if there is one, else a new
    ``<version prefix>_slurm<array job>_<task>`` (nothing when the run already finished: the
    task ends), then runs ``srun python -m lit_divnorm.experiments.sweep --run-one CONFIG --log-dir
    DIR``,
    so every rank of a multi-GPU task logs into the same folder, and the run's record goes to
    ``results_dir``.

    ``throttle``: tasks at a time (``--array=0-N%K``); ``cpus_per_task``: CPU cores of a task
    (also its ``OMP_NUM_THREADS``); ``time_limit``: ``--time`` (``H:MM:SS``, e.g. from a dry
    run's estimate); ``environment``: a virtual environment folder (``source
    DIR/bin/activate``) or a conda environment name (``conda activate NAME``) to activate
    first, then its ``python`` runs (else this interpreter); ``only``: these configs of the
    folder; ``options``: extra ``#SBATCH``
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
        raise ValueError(
            f"time_limit (--slurm-time) must be SLURM's [D-]H[:MM[:SS]], got {time_limit!r}"
        )
    configs = [path.resolve() for path in find_configs(config_dir)]
    if only:
        chosen = {Path(path).resolve() for path in only}
        unknown = sorted(str(path) for path in chosen - set(configs))
        if unknown:
            raise ValueError(f"only must name configs of {str(config_dir)!r}, got {unknown}")
        configs = [config for config in configs if config in chosen]
    runs_dir = Path(runs_dir).resolve()
    python = shlex.quote(sys.executable) if environment is None else "python"
    seed_count = len(seeds) if seeds else 1
    record = (
        []
        if results_dir is None
        else ["--results-dir", shlex.quote(str(Path(results_dir).resolve()))]
    )
    record += ["--partial"] if partial else []
    lines = [
        *_sbatch_lines(job_name, len(configs) * seed_count, throttle, runs_dir),
        f"#SBATCH --cpus-per-task={cpus_per_task}",
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
                "-m lit_divnorm.experiments.sweep",
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
                '-m lit_divnorm.experiments.sweep --run-one "$CONFIG"',
                *record,
                '--log-dir "$LOG_DIR" --',
                *(shlex.quote(o) for o in overrides),
                '"${RUN_SEED[@]}"',
            ]
        ),
    ]
    return "\n".join(lines) + "\n"


def _sbatch_lines(job_name: str, tasks: int, throttle: int | None, runs_dir: Path) -> list[str]:
    """The job's name, its array of ``tasks`` (``%throttle`` at a time), its output files,
    and what makes it survive its time limit: SIGUSR1 120 s before it, and requeueing."""
    array = f"0-{tasks - 1}" + (f"%{throttle}" if throttle else "")
    return [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={runs_dir}/slurm/%A_%a.out",
        "#SBATCH --signal=SIGUSR1@120",
        "#SBATCH --requeue",
    ]


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


def slurm_time_limit(runs: Iterable[Any], margin: float = 1.5) -> str | None:
    """``--time`` for the longest of ``runs`` (:class:`~lit_divnorm.experiments.sweep.SweepRun`)
    that a dry run timed: its planned steps x step
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
