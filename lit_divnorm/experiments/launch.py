"""Run commands as separate processes, K at a time per device.

A :class:`Slot` is one place a process runs: a CUDA device (``CUDA_VISIBLE_DEVICES`` set to
it, so the process sees it as ``cuda:0``) or the machine's default device, with a share of the
CPU cores (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = available cores // number of slots, at
least 1; torch reads them when it starts). :func:`run_jobs` keeps every slot busy with the next
waiting :class:`Job` until none is left. On a stop request (a signal its caller recorded) it
starts nothing more, sends the running processes SIGTERM once and waits for them (each saves
``last.ckpt`` at its current step and ends STOPPED, :mod:`lit_divnorm.stopping`); on an
exception (a second Ctrl-C) it sends SIGTERM, waits 60 s, then kills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Slot:
    """One process place: ``device`` a CUDA device index (``None``: the default device) and
    ``threads`` CPU threads."""

    index: int
    device: str | None
    threads: int

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with this slot's thread count and device."""
        env = dict(os.environ if base is None else base)
        for name in THREAD_VARIABLES:
            env[name] = str(self.threads)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.device
        return env

    def describe(self) -> str:
        where = f"cuda device {self.device}" if self.device is not None else "default device"
        return f"slot {self.index} ({where}, {self.threads} threads)"


def make_slots(
    parallel: int,
    devices: Iterable[str | int] | None = None,
    cpus: int | None = None,
    threads: int | None = None,
) -> list[Slot]:
    """``parallel`` slots per device of ``devices`` (CUDA indices; ``None`` or empty: one
    default device), each with ``threads`` threads: given, else the user's own
    ``OMP_NUM_THREADS`` when it is set, else ``cpus // number of slots`` (at least 1; ``cpus``
    defaults to :func:`available_cpus`). A sweep's dry run and its runs use the same slots,
    so the timing runs with the threads the runs will have."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an int >= 1, got {parallel!r}")
    names = [str(device) for device in devices or ()]
    bad = [name for name in names if not name.isdigit()]
    if bad:
        raise ValueError(f"devices must be CUDA device indices (0, 1, ...), got {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"devices must not repeat a device, got {names}")
    places: list[str | None] = list(names) or [None]
    cpus = available_cpus() if cpus is None else cpus
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ValueError(f"cpus must be an int >= 1, got {cpus!r}")
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    if threads is None:
        threads = max(1, cpus // (parallel * len(places)))
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    return [
        Slot(index, device, threads)
        for index, device in enumerate(place for place in places for _ in range(parallel))
    ]


@dataclass
class Job:
    """A command to run in a slot; ``on_exit(return code, slot)`` is called when it ends.
    ``log_file``: where its stdout and stderr go (appended), ``None`` to inherit ours;
    ``on_start(slot)`` is called when it starts."""

    command: list[str]
    on_exit: Callable[[int, Slot], None]
    log_file: Path | None = None
    on_start: Callable[[Slot], None] | None = None
    cwd: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


def run_jobs(
    jobs: Iterable[Job],
    slots: list[Slot],
    poll_seconds: float = 0.2,
    stop_requested: Callable[[], object] | None = None,
) -> list[Job]:
    """Run ``jobs`` in order, one per free slot, until all have ended; returns the jobs never
    started.

    When ``stop_requested()`` turns true (a signal the caller recorded), no job starts any
    more, the running ones get SIGTERM once (each then stops at its next step, resumable) and
    this waits for them to end.
    """
    if not slots:
        raise ValueError("slots must hold at least one Slot")
    waiting = deque(jobs)
    running: dict[int, tuple[subprocess.Popen, Job, Slot, IO[str] | None]] = {}
    forwarded = False
    try:
        while waiting or running:
            if stop_requested is not None and stop_requested():
                if not forwarded:
                    for process, *_ in running.values():
                        if process.poll() is None:
                            process.send_signal(signal.SIGTERM)
                    forwarded = True
                if not running:
                    break
            for slot in slots:
                if slot.index in running or not waiting or forwarded:
                    continue
                job = waiting.popleft()
                if job.on_start is not None:
                    job.on_start(slot)
                handle = None
                if job.log_file is not None:
                    job.log_file.parent.mkdir(parents=True, exist_ok=True)
                    handle = job.log_file.open("a")
                process = subprocess.Popen(
                    job.command,
                    env={**slot.environment(), **job.extra_env},
                    cwd=job.cwd,
                    stdout=handle,
                    stderr=subprocess.STDOUT if handle is not None else None,
                )
                running[slot.index] = (process, job, slot, handle)
            ended = [key for key, (process, *_) in running.items() if process.poll() is not None]
            for key in ended:
                process, job, slot, handle = running.pop(key)
                if handle is not None:
                    handle.close()
                job.on_exit(process.returncode, slot)
            if not ended:
                time.sleep(poll_seconds)
    finally:
        _stop(running)
    return list(waiting)


def _stop(running: dict[int, tuple[subprocess.Popen, Job, Slot, IO[str] | None]]) -> None:
    """SIGTERM every process still running, SIGKILL those alive after 60 s."""
    for process, *_ in running.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60.0
    for process, _, _, handle in running.values():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if handle is not None:
            handle.close()
