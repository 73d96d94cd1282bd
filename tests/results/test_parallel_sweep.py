"""The sweep with --seeds and --parallel: processes K at a time with their share of the cores,
a folder per seed, a record per finished run, skips, resumes and the dry-run plan."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from lit_divnorm.cli import main as cli_main
from lit_divnorm.experiments.configs import check_seeds
from lit_divnorm.experiments.launch import Job, available_cpus, make_slots, run_jobs
from lit_divnorm.experiments.records import RECORD_FIELDS, load_records
from lit_divnorm.experiments.slurm import slurm_script
from lit_divnorm.experiments.sweep import SWEEP_LOG
from lit_divnorm.runs import DONE_MARKER
from tests.conftest import REPO_ROOT
from tests.results.tiny_configs import write_tiny_sweep

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]

PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    start = time.time()
    time.sleep(0.6)
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    facts = {name: os.environ.get(name) for name in names}
    print(json.dumps({**facts, "start": start, "end": time.time(), "job": sys.argv[1]}))
    """
)


def _final_test(metrics_csv, column="test/acc"):
    with open(metrics_csv, newline="") as handle:
        return float([row[column] for row in csv.DictReader(handle) if row.get(column)][-1])


def test_slots_split_the_cores_and_run_jobs_keeps_each_slot_busy(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own thread count wins
    assert [slot.threads for slot in make_slots(2, cpus=8)] == [3, 3]
    monkeypatch.delenv("OMP_NUM_THREADS")
    slots = make_slots(2, devices=["0", "3"], cpus=8)
    assert [(s.device, s.threads) for s in slots] == [("0", 2), ("0", 2), ("3", 2), ("3", 2)]
    assert make_slots(3, cpus=2)[0].threads == 1  # never fewer than one thread
    assert make_slots(2, cpus=8, threads=1)[1].threads == 1
    for bad, message in (
        (dict(parallel=0), "parallel must be an int >= 1, got 0"),
        (dict(parallel=1, devices=["gpu0"]), "CUDA device indices"),
        (dict(parallel=1, devices=["1", "1"]), "must not repeat"),
        (dict(parallel=1, threads=0), "threads must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            make_slots(**bad)

    ended = []
    jobs = [
        Job(
            [sys.executable, "-c", PROBE, str(number)],
            lambda code, slot, n=number: ended.append((n, code, slot.index)),
            log_file=tmp_path / f"{number}.log",
        )
        for number in range(4)
    ]
    run_jobs(jobs, make_slots(1, devices=["0", "1"], cpus=4))
    assert sorted(n for n, code, _ in ended) == [0, 1, 2, 3]
    assert all(code == 0 for _, code, _ in ended)
    facts = [json.loads((tmp_path / f"{n}.log").read_text()) for n in range(4)]
    assert {f["OMP_NUM_THREADS"] for f in facts} == {"2"} == {f["MKL_NUM_THREADS"] for f in facts}
    assert sorted(f["CUDA_VISIBLE_DEVICES"] for f in facts) == ["0", "0", "1", "1"]
    # two at a time: every moment is inside at most two runs, and two did overlap
    moments = sorted({f["start"] + 0.01 for f in facts} | {f["end"] - 0.01 for f in facts})
    inside = [sum(f["start"] <= t <= f["end"] for f in facts) for t in moments]
    assert max(inside) == 2


def test_seeds_run_in_parallel_processes_each_recorded_then_skipped(tmp_path):
    folder = write_tiny_sweep(tmp_path, {"dn_star": {"name": "dn*", "sigma": 0.5}})
    runs, results = tmp_path / "runs", tmp_path / "results"
    command = [sys.executable, "-m", "lit_divnorm.cli", "sweep", str(folder), "--seeds", "0", "1"]
    command += ["--parallel", "2", "--runs-dir", str(runs), "--results-dir", str(results)]
    ran = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    lines = ran.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("[sweep] start")]
    finished = [i for i, line in enumerate(lines) if re.match(r"\[sweep\] \[\d/2\] done", line)]
    assert len(starts) == 2 and len(finished) == 2
    assert max(starts) < min(finished)  # the second started before the first ended
    assert "1 threads" in lines[starts[0]] or available_cpus() > 2

    records = load_records(results)
    assert len(records) == 2
    by_seed = {record["seed"]: record for record in records.values()}
    assert sorted(by_seed) == [0, 1]
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    for seed, record in by_seed.items():
        run_dir = runs / "cifar10" / "dn_star" / f"seed{seed}_version_0"
        assert (run_dir / DONE_MARKER).is_file() and (run_dir / SWEEP_LOG).is_file()
        assert f"seed_everything: {seed}\n" in (run_dir / "config.yaml").read_text()
        assert set(RECORD_FIELDS) <= set(record)
        assert record["experiment"] == "cifar10/dn_star" and record["metric"] == "test/acc"
        assert record["value"] == _final_test(run_dir / "metrics.csv")  # read, not retyped
        assert (record["steps"], record["schedule_steps"], record["complete"]) == (6, 6, True)
        assert record["threads"] == max(1, available_cpus() // 2)  # the cores split in two
        assert record["device"].startswith("cpu: ")
        assert record["versions"]["torch"] == torch.__version__
        assert record["git_commit"] == commit and isinstance(record["git_dirty"], bool)
        assert record["wall_time_s"] > 0 and f"--seed_everything={seed}" in record["command"]
        assert record["source"]["run_dir"] == str(run_dir.resolve())
    # one config, two seeds: one config hash, two different runs
    assert by_seed[0]["config_sha256"] == by_seed[1]["config_sha256"]
    assert by_seed[0]["source"]["metrics_sha256"] != by_seed[1]["source"]["metrics_sha256"]

    seeded = ["sweep", str(folder), "--seeds", "0", "1", "--runs-dir", str(runs)]
    again = cli_main([*seeded, "--results-dir", str(results), "--parallel", "2"])
    assert [run.status for run in again] == ["skipped", "skipped"]
    assert sorted(p.name for p in (runs / "cifar10" / "dn_star").iterdir()) == [
        "seed0_version_0",
        "seed1_version_0",
    ]
    assert load_records(results).keys() == records.keys()  # nothing new, nothing rewritten


def test_a_stopped_seed_is_planned_for_its_remaining_steps_and_continued(tmp_path, capsys):
    folder = write_tiny_sweep(tmp_path, {"bn": "bn"})
    runs, results = tmp_path / "runs", tmp_path / "results"
    base = ["sweep", str(folder), "--seeds", "3", "--runs-dir", str(runs)]
    base += ["--results-dir", str(results), "--in-process"]
    cli_main([*base, "--", "--trainer.max_steps=3"])  # one epoch of the 6 steps...
    stopped = runs / "cifar10" / "bn" / "seed3_version_0"
    (stopped / DONE_MARKER).unlink()  # ...then "killed"
    for path in results.rglob("*.json"):
        path.unlink()
    capsys.readouterr()

    (planned,) = cli_main([*base, "--dry-run", "--dry-run-steps", "2", "--dry-run-warmup", "1"])
    out = capsys.readouterr().out
    assert (planned.status, planned.resume, planned.log_dir) == ("planned", True, stopped)
    assert planned.planned_steps == 6 - 3  # the schedule less the checkpoint's step
    milliseconds = planned.step_seconds * 1e3
    line = next(line for line in out.splitlines() if line.strip().startswith("cifar10/bn "))
    assert line.split()[1:4] == ["1", "3", f"{milliseconds:.1f}"]
    assert f"{3 * planned.step_seconds:.1f} s" in line  # steps x step time
    assert not list(results.rglob("*.json"))  # a dry run records nothing

    (run,) = cli_main(base)
    assert (run.status, run.log_dir) == ("done", stopped)
    summary = json.loads((stopped / DONE_MARKER).read_text())
    assert (summary["global_step"], summary["resumed_from_step"], summary["seed"]) == (6, 3, 3)
    (record,) = load_records(results).values()
    assert (record["seed"], record["steps"], record["complete"]) == (3, 6, True)

    # a finished run whose record went missing gets it back from the next sweep
    (path,) = load_records(results)
    path.unlink()
    (again,) = cli_main(base)
    assert again.status == "skipped" and path.is_file()


def test_dry_run_times_in_processes_like_the_sweep_without_writing(tmp_path, capsys):
    folder = write_tiny_sweep(tmp_path, {"dn": {"name": "dn", "sigma": 0.5}})
    runs = tmp_path / "runs"
    seeded = ["sweep", str(folder), "--seeds", "0", "1", "--runs-dir", str(runs), "--dry-run"]
    planned = cli_main(
        [*seeded, "--dry-run-steps", "2", "--dry-run-warmup", "1", "--parallel", "2"]
    )
    out = capsys.readouterr().out
    assert not runs.exists()
    assert [run.planned_steps for run in planned] == [6, 6]  # timed once, planned per seed
    per_config = {run.config.stem: run.step_seconds for run in planned}
    assert all(seconds > 0 for seconds in per_config.values())
    total = sum(12 * seconds for seconds in per_config.values())  # 2 seeds x 6 steps each
    assert "2 run(s) at a time" in out
    assert re.search(r"total: [\d.]+ s of run time, about [\d.]+ s of wall time at 2 at a ", out)
    shown = float(re.search(r"total: ([\d.]+) s", out).group(1))
    assert abs(shown - total) <= 0.05 + 1e-9


def test_seed_and_option_mistakes_are_refused(tmp_path):
    assert check_seeds([0, 7]) == [0, 7] and check_seeds(None) is None
    for bad in ([-1], [2**32], [1, 1], []):
        with pytest.raises(ValueError, match="seeds"):
            check_seeds(bad)
    folder = write_tiny_sweep(tmp_path, {"bn": "bn"})
    with pytest.raises(ValueError, match="give the seeds with --seeds"):
        slurm_script(folder, seeds=[0], overrides=["--seed_everything=4"])
    for args in (
        ["--in-process", "--parallel", "2"],
        ["--in-process", "--devices", "0"],
        ["--dry-run", "--dry-run-warmup", "0"],
        ["--parallel", "0"],
        ["--seeds", "1", "1"],
        ["--only", str(tmp_path / "elsewhere.yaml")],
    ):
        with pytest.raises(SystemExit) as stop:
            cli_main(["sweep", str(folder), "--runs-dir", str(tmp_path / "r"), *args])
        assert stop.value.code == 2
    assert not (tmp_path / "r").exists()


def test_slurm_array_runs_each_config_and_seed(tmp_path):
    folder = write_tiny_sweep(tmp_path, {"bn": "bn"})
    runs = tmp_path / "runs"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("echo activated\n")
    script = slurm_script(
        folder,
        runs,
        ["--trainer.max_steps=2"],
        seeds=[5, 9],
        throttle=1,
        cpus_per_task=3,
        time_limit="2:30:00",
        environment=str(venv),
    )
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for option in (
        "--array=0-1%1",  # one task at a time
        "--cpus-per-task=3",
        "--signal=SIGUSR1@120",  # checkpoint and requeue before the time limit
        "--requeue",
        "--time=2:30:00",
    ):
        assert f"#SBATCH {option}" in header, option
    assert f"source {venv.resolve()}/bin/activate" in script
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (fake / "srun").chmod(0o755)
    (fake / "python").symlink_to(sys.executable)  # the environment's python
    job = tmp_path / "job.sh"
    job.write_text(script)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1"}
    env["SLURM_ARRAY_JOB_ID"] = "77"
    ran = subprocess.run(["bash", str(job)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("activated\n")
    # task 1: config 0, seed 9, in a folder named after the array job and task
    log_dir = runs.resolve() / "cifar10" / "bn" / "seed9_version_slurm77_1"
    assert f"--log-dir {log_dir} -- --trainer.max_steps=2 --seed_everything=9" in ran.stdout
    # requeued after SIGUSR1 (same ids) or submitted again (new ids): the stopped folder of
    # the sweep is continued either way
    (log_dir / "checkpoints").mkdir(parents=True)
    (log_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (log_dir / "SWEEP").write_text("{}")
    again = subprocess.run(
        ["bash", str(job)],
        cwd=REPO_ROOT,
        env={**env, "SLURM_ARRAY_JOB_ID": "78"},
        capture_output=True,
        text=True,
    )
    assert f"--log-dir {log_dir} --" in again.stdout, again.stderr
    with pytest.raises(ValueError, match=r"time_limit \(--slurm-time\) must be SLURM's"):
        slurm_script(folder, runs, time_limit="soon")


def test_the_slurm_time_limit_comes_from_the_dry_run_estimate(tmp_path):
    from lit_divnorm.experiments.slurm import slurm_time_limit
    from lit_divnorm.experiments.sweep import SweepRun

    def planned(steps, seconds):
        run = SweepRun(tmp_path / "c.yaml", "cifar10", tmp_path, "planned")
        run.planned_steps, run.step_seconds = steps, seconds
        return run

    # the longest run: 80,000 steps x 0.05 s = 4,000 s; x 1.5 + 15 min = 6,900 s
    runs = [planned(80000, 0.05), planned(50000, 0.05), planned(None, None)]
    assert slurm_time_limit(runs) == "1:55:00"
    assert slurm_time_limit([planned(None, None)]) is None


def test_the_slurm_job_of_only_some_configs_runs_only_those(tmp_path):
    folder = write_tiny_sweep(tmp_path, {"bn": "bn", "dn": "dn"})
    script = slurm_script(folder, tmp_path / "runs", only=[folder / "dn.yaml"], seeds=[0, 1])
    assert "#SBATCH --array=0-1" in script  # one config x two seeds
    assert str((folder / "dn.yaml").resolve()) in script
    assert str((folder / "bn.yaml").resolve()) not in script
    with pytest.raises(ValueError, match="only must name configs of"):
        slurm_script(folder, tmp_path / "runs", only=[tmp_path / "elsewhere.yaml"])
