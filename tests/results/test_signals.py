"""Signals leave runs resumable: a real ``sweep --parallel 2`` stopped by SIGINT (a terminal's
Ctrl-C, to the whole process group) or SIGTERM (to the sweep alone) marks both runs STOPPED
with last.ckpt at their step, exits non-zero, and the same sweep continues them to the weights
of uninterrupted runs; SIGUSR1 under SLURM checkpoints and requeues (a fake scontrol)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_divnorm.checkpoint import load_checkpoint_safely
from lit_divnorm.experiments.records import load_records
from lit_divnorm.runs import DONE_MARKER, FAILED_MARKER
from lit_divnorm.stopping import STOPPED_MARKER
from tests.conftest import REPO_ROOT
from tests.results.tiny_configs import write_tiny_sweep

PAUSE_STEP = 2  # of 6: inside the first epoch (3 steps), where no periodic save falls
SEEDS = ("0", "1")
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals only")


def _sweep_folder(root: Path) -> Path:
    """One tiny dn* config whose runs wait at PAUSE_STEP when the test asks them to."""
    folder = write_tiny_sweep(root, {"dn_star": {"name": "dn*", "sigma": 0.5, "l1": 0.01}})
    path = folder / "dn_star.yaml"
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "tests.scale.helpers.WaitForStop", "init_args": {"step": PAUSE_STEP}}
    )
    path.write_text(yaml.safe_dump(config))
    return folder


def _sweep(folder: Path, runs: Path, results: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "lit_divnorm.cli", "sweep", str(folder), "--seeds", *SEEDS),
        *("--parallel", "2", "--runs-dir", str(runs), "--results-dir", str(results)),
    ]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_safely(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def _start_until_paused(
    command: list[str], env: dict[str, str], pauses: Path, runs: int
) -> subprocess.Popen:
    """Start ``command`` in its own process group (as a terminal job is) and wait until
    ``runs`` of its runs wait at PAUSE_STEP (:class:`tests.scale.helpers.WaitForStop`)."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while len(list(pauses.glob("*.paused"))) < runs:
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the runs never reached the pause step"
        time.sleep(0.1)
    return process


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same sweep, never signalled."""
    root = tmp_path_factory.mktemp("reference")
    folder = _sweep_folder(root)
    ran = subprocess.run(
        _sweep(folder, root / "runs", root / "results"),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    runs = root / "runs" / "cifar10" / "dn_star"
    return {seed: _weights(runs / f"seed{seed}_version_0") for seed in SEEDS}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_sweep_stops_its_runs_resumable_and_continues_them(
    tmp_path, signum, uninterrupted
):
    folder = _sweep_folder(tmp_path)
    runs, results, pauses = tmp_path / "runs", tmp_path / "results", tmp_path / "pauses"
    pauses.mkdir()
    env = _env(LIT_DIVNORM_TEST_PAUSE=str(pauses))
    sweep = _start_until_paused(_sweep(folder, runs, results), env, pauses, runs=2)
    if signum == signal.SIGINT:
        os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C reaches the sweep and every run
    else:
        sweep.send_signal(signal.SIGTERM)  # a scheduler stops the sweep alone
    output, _ = sweep.communicate(timeout=180)
    assert sweep.returncode == 128 + signum, output[-3000:]
    assert f"stopped by {signum.name}" in output
    experiment = runs / "cifar10" / "dn_star"
    for seed in SEEDS:
        run_dir = experiment / f"seed{seed}_version_0"
        stopped = json.loads((run_dir / STOPPED_MARKER).read_text())
        assert stopped["step"] == PAUSE_STEP, output[-3000:]
        assert not (run_dir / FAILED_MARKER).exists() and not (run_dir / DONE_MARKER).exists()
        assert (
            load_checkpoint_safely(run_dir / "checkpoints" / "last.ckpt")["global_step"]
            == PAUSE_STEP
        )
        assert f"STOPPED cifar10/dn_star seed {seed}" in output
    assert not results.exists() or not load_records(results)  # a stopped run is no record

    again = subprocess.run(
        _sweep(folder, runs, results),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("continue cifar10/dn_star") == 2  # the same folders, continued
    assert sorted(p.name for p in experiment.iterdir()) == ["seed0_version_0", "seed1_version_0"]
    for seed in SEEDS:
        run_dir = experiment / f"seed{seed}_version_0"
        assert (run_dir / DONE_MARKER).is_file() and not (run_dir / STOPPED_MARKER).exists()
        weights = _weights(run_dir)
        assert weights.keys() == uninterrupted[seed].keys()
        for name, value in uninterrupted[seed].items():
            torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert sorted(r["steps"] for r in load_records(results).values()) == [6, 6]


def test_sigusr1_under_slurm_checkpoints_and_requeues_the_job(tmp_path):
    folder = _sweep_folder(tmp_path)
    bin_dir, pauses = tmp_path / "bin", tmp_path / "pauses"
    bin_dir.mkdir()
    pauses.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    run_dir = tmp_path / "runs" / "cifar10" / "dn_star" / "slurm_77_3"
    env = _env(
        LIT_DIVNORM_TEST_PAUSE=str(pauses),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="78",
        SLURM_ARRAY_JOB_ID="77",
        SLURM_ARRAY_TASK_ID="3",
    )
    command = [
        sys.executable,
        "-m",
        "lit_divnorm.experiments.sweep",
        "--run-one",
        str(folder / "dn_star.yaml"),
    ]
    command += ["--log-dir", str(run_dir), "--results-dir", "none"]
    run = _start_until_paused(command, env, pauses, runs=1)
    run.send_signal(signal.SIGUSR1)  # SLURM's --signal=SIGUSR1@120 before the time limit
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGUSR1, output[-3000:]
    assert calls.read_text().split() == ["requeue", "77_3"]  # the array task, requeued
    assert json.loads((run_dir / STOPPED_MARKER).read_text())["signal"] == "SIGUSR1"
    assert (
        load_checkpoint_safely(run_dir / "checkpoints" / "last.ckpt")["global_step"] == PAUSE_STEP
    )
    assert not (run_dir / FAILED_MARKER).exists()
