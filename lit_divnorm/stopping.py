"""A run stopped by a signal ends resumable: ``last.ckpt`` at the current step, a ``STOPPED``
marker, a non-zero exit status, and on SLURM a requeued job.

    SIGINT (Ctrl-C), SIGTERM, SIGUSR1 (SLURM's warning before the time limit, --signal)
        -> the step in progress finishes
        -> checkpoints/last.ckpt at that step (ResumeCheckpoint), <run folder>/STOPPED (JSON:
           the signal, the step, the time)
        -> SIGUSR1 under SLURM: ``scontrol requeue <job>``
        -> RunStopped; the process exits with 128 + the signal's number (130, 143, 138)

``fit --ckpt_path last`` (or the next ``sweep``) continues the run exactly from that step and
removes the marker. A second Ctrl-C aborts at once, as Python's default does. Under a
distributed launch every rank stops at the same step (the request is reduced over the ranks
at every step end, one boolean all-reduce).

:func:`install_stop_handlers` sets the handlers; the CLI and the sweep's runs call it before
the trainer starts, and :class:`~lit_divnorm.callbacks.ResumeCheckpoint` at ``setup`` (for a
``Trainer`` used directly). The handlers only record the request: no exception is ever raised
in the middle of a step, a data load or a checkpoint write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

STOPPED_MARKER = "STOPPED"
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)
_requested: int | None = None


class RunStopped(Exception):
    """Training stopped on a signal after saving ``last.ckpt`` at ``step``; the run can be
    continued with ``--ckpt_path last``."""

    def __init__(self, signum: int, step: int, run_dir: Path | None) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        where = f" in {run_dir}" if run_dir is not None else ""
        super().__init__(
            f"stopped by {signal_name(signum)} at step {step}; last.ckpt saved{where}. "
            "Continue with the same command and --ckpt_path last (or the same sweep)."
        )

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, the shell's convention for a process ended by a signal."""
        return 128 + int(self.signum)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _record(signum: int, frame: Any) -> None:
    global _requested
    if _requested is not None and signum == getattr(signal, "SIGINT", None):
        raise KeyboardInterrupt  # a second Ctrl-C: abort now
    if _requested is None:
        print(
            f"lit-divnorm: {signal_name(signum)} received: stopping after this step with "
            "last.ckpt saved" + (" (Ctrl-C again to abort now)" if signum == signal.SIGINT else ""),
            flush=True,
        )
    _requested = signum


def install_stop_handlers() -> None:
    """Record SIGINT, SIGTERM and SIGUSR1 as a stop request instead of their default action
    (in the main thread only; elsewhere Python allows no handler and nothing changes)."""
    try:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not _record:
                signal.signal(signum, _record)
    except ValueError:  # not the main thread
        pass


def stop_requested() -> int | None:
    """The signal of a pending stop request, ``None`` when there is none."""
    return _requested


def clear_stop_request() -> None:
    """Forget a stop request (a test, or a process that goes on after handling it)."""
    global _requested
    _requested = None


def write_stopped_marker(run_dir: Path, signum: int, step: int) -> Path:
    """``run_dir/STOPPED``: the signal, the step of ``last.ckpt`` and the time, as JSON."""
    from lit_divnorm.checkpoint import atomic_write_text

    path = Path(run_dir) / STOPPED_MARKER
    record = {"signal": signal_name(signum), "step": step, "time": time.time()}
    atomic_write_text(path, json.dumps(record) + "\n")
    return path


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` of a SLURM array task, else ``SLURM_JOB_ID``; ``None`` outside
    SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (with ``--requeue`` it runs again and continues the
    run); false, with a line saying why, when not under SLURM or scontrol fails."""
    job = slurm_job_id()
    if job is None:
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        print("lit-divnorm: SIGUSR1 under SLURM, but no scontrol on PATH: not requeued")
        return False
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"lit-divnorm: scontrol requeue {job} failed: {result.stderr.strip()}")
        return False
    print(f"lit-divnorm: requeued SLURM job {job}", flush=True)
    return True
