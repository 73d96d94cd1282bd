"""Sweep three tiny configs (one broken), report them beside the paper, re-run, plot."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from lit_divnorm.cli import main as cli_main
from lit_divnorm.experiments.configs import find_configs
from lit_divnorm.experiments.paper import PAPER_TABLES
from lit_divnorm.experiments.slurm import slurm_script
from lit_divnorm.runs import DONE_MARKER, FAILED_MARKER
from tests.conftest import REPO_ROOT
from tests.results.tiny_configs import write_tiny_sweep

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def _last_value(metrics_csv, column):
    """The last non-empty ``column`` of a CSVLogger file, read directly."""
    with open(metrics_csv, newline="") as handle:
        values = [row[column] for row in csv.DictReader(handle) if row.get(column)]
    return float(values[-1])


def _table_rows(markdown: str, title: str, column: str) -> dict[str, list[str]]:
    """``{model: [ours, seeds, paper, diff, notes]}`` of one column's table of ``title``."""
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    block = section.split(f"### {column}\n", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| Model"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    folder = write_tiny_sweep(
        root, {"bn": "bn", "dn_star": {"name": "dn*", "sigma": 0.5}, "bn_l1": "BROKEN"}
    )
    runs = root / "runs"
    args = ["--runs-dir", str(runs), "--results-dir", str(root / "results"), "--in-process"]
    first = cli_main(["sweep", str(folder), *args])
    return root, folder, runs, first


def test_sweep_runs_every_config_and_a_failure_does_not_stop_the_others(swept):
    _, _, runs, first = swept
    status = {run.config.stem: run.status for run in first}
    assert status == {"bn": "done", "bn_l1": "failed", "dn_star": "done"}  # _data.yaml skipped
    assert [run.config.stem for run in first] == ["bn", "bn_l1", "dn_star"]  # ran in order
    for name in ("bn", "dn_star"):
        log_dir = runs / "cifar10" / name / "version_0"
        assert (log_dir / DONE_MARKER).is_file()
        assert (log_dir / "metrics.csv").is_file() and (log_dir / "config.yaml").is_file()
        assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    failed = runs / "cifar10" / "bn_l1" / "version_0"
    assert "no-such-norm" in (failed / FAILED_MARKER).read_text()
    assert not (failed / DONE_MARKER).exists()


def test_rerun_skips_finished_runs_and_retries_failed_ones(swept):
    root, folder, runs, _ = swept
    args = ["--runs-dir", str(runs), "--results-dir", str(root / "results"), "--in-process"]
    again = cli_main(["sweep", str(folder), *args])
    status = {run.config.stem: run.status for run in again}
    assert status == {"bn": "skipped", "dn_star": "skipped", "bn_l1": "failed"}
    assert not (runs / "cifar10" / "bn" / "version_1").exists()
    assert (runs / "cifar10" / "bn_l1" / "version_1" / FAILED_MARKER).is_file()


def test_a_stopped_run_is_continued_in_its_own_folder(tmp_path):
    """A run killed after a checkpoint (no DONE, no FAILED) is continued with --ckpt_path
    last by the next sweep, in the same version folder, and its metrics kept."""
    folder = write_tiny_sweep(tmp_path, {"bn": "bn"})
    runs = tmp_path / "runs"
    args = ["sweep", str(folder), "--runs-dir", str(runs), "--results-dir", "none", "--in-process"]
    cli_main([*args, "--", "--trainer.max_steps=3"])  # one epoch, then "killed":
    stopped = runs / "cifar10" / "bn" / "version_0"
    (stopped / DONE_MARKER).unlink()
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    (run,) = cli_main(args)  # the configs' own max_steps: 6
    assert (run.status, run.log_dir, run.resume) == ("done", stopped, True)
    assert json.loads((stopped / DONE_MARKER).read_text())["global_step"] == 6
    assert not (runs / "cifar10" / "bn" / "version_1").exists()
    steps = [int(row["step"]) for row in csv.DictReader((stopped / "metrics.csv").open())]
    assert set(range(6)) <= set(steps)  # the first attempt's rows (0-2) are still there


def test_report_table_has_ours_beside_the_paper_and_marks_missing_runs(swept, tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")
    _, _, runs, _ = swept
    report = cli_main(["report", str(runs), "--out", str(tmp_path / "report.md")])
    markdown = report.read_text()
    rows = _table_rows(markdown, "Table 3: CIFAR test accuracy", "CIFAR-10")
    spec = PAPER_TABLES["cifar"]
    assert list(rows) == list(spec["rows"].values())  # every paper row, in the paper's order
    for name, label in (("bn", "BN"), ("dn_star", "DN*")):
        ours = _last_value(runs / "cifar10" / name / "version_0" / "metrics.csv", "test/acc")
        paper = spec["values"][name]["cifar10"]
        # ours, seeds, paper, diff, notes: one seed (the config's), its whole schedule of 6 steps
        assert rows[label] == [f"{ours:.4f}", "1", f"{paper:.4f}", f"{ours - paper:+.4f}", ""]
    # ran and failed: no number and no 0, the failure named with its steps
    assert rows["BN +L1"][:4] == ["", "0", "0.8067", ""]
    assert re.fullmatch(r"\d failed \(0/\?(, 0/\?)* steps\)", rows["BN +L1"][4])
    assert rows["LN"] == ["", "0", "0.7211", "", ""]
    assert "No runs yet: CIFAR-100." in markdown  # no CIFAR-100 run: no CIFAR-100 table
    table_4 = markdown.split("## Table 4", 1)[1].split("\n## ", 1)[0]
    assert "No runs yet: LSTM, tanh RNN, ReLU RNN." in table_4  # no PTB run, an empty table
    for name in ("diff_cifar.png", "curves_cifar_cifar-10.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 200
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 20  # marks and text, not blank


def test_dry_run_and_slurm_script_plan_without_running(swept, tmp_path):
    _, folder, _, _ = swept
    args = ["--runs-dir", str(tmp_path / "r"), "--dry-run", "--dry-run-steps", "0"]
    planned = cli_main(["sweep", str(folder), *args])  # a list, no timing
    assert [run.status for run in planned] == ["planned"] * 3
    assert not (tmp_path / "r").exists()
    two = [str(folder / "dn_star.yaml"), str(folder / "bn.yaml")]
    chosen = cli_main(["sweep", str(folder), *args, "--only", *two])
    assert [run.config.stem for run in chosen] == ["bn", "dn_star"]  # the folder's order
    script = slurm_script(
        folder, tmp_path / "r", ["--trainer.max_steps=5"], options=["--gres=gpu:1"]
    )
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:1" in script
    for config in find_configs(folder):
        assert str(config.resolve()) in script
    assert '--log-dir "$LOG_DIR" -- --trainer.max_steps=5' in script


def test_sweep_as_separate_processes_and_the_slurm_script(tmp_path):
    folder = write_tiny_sweep(tmp_path, {"a_broken": "BROKEN", "bn": "bn"})
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "lit_divnorm.cli", "sweep", str(folder), "--runs-dir"]
    command += [str(runs), "--results-dir", str(tmp_path / "results"), "--threads", "1"]
    command += ["--", "--trainer.max_steps=2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]  # a failed run fails the sweep...
    assert "1 done, 0 skipped, 1 failed" in result.stdout  # ...after the others ran
    assert '"global_step": 2' in (runs / "cifar10" / "bn" / "version_0" / DONE_MARKER).read_text()
    assert (runs / "cifar10" / "a_broken" / "version_0" / FAILED_MARKER).is_file()

    script = tmp_path / "job.sh"
    results = ["--results-dir", str(tmp_path / "results")]
    cli_main(["sweep", str(folder), "--runs-dir", str(runs), *results, "--slurm", str(script)])
    assert (runs / "slurm").is_dir()  # SLURM opens its --output file before the job starts
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "41"}
    for task, expected in ((1, "already finished"), (0, "--run-one")):
        env["SLURM_ARRAY_TASK_ID"] = str(task)
        ran = subprocess.run(
            ["bash", str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True
        )
        assert ran.returncode == 0, ran.stderr
        assert expected in ran.stdout
    # the failed run is not continued: a new folder, named after the array job and task
    assert f"--log-dir {runs.resolve()}/cifar10/a_broken/version_slurm41_0 --" in ran.stdout
