"""The effective batch is part of a row's identity: a real 2-process (gloo) run at batch B per
process and a 1-process run at B are two experiments (global 2B and B), never one mean; with
GlobalBatch the 2-process run keeps the global B (B / 2 each), and a count that does not
divide B is refused before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from lit_divnorm.experiments.records import load_records
from lit_divnorm.experiments.report import write_report
from lit_divnorm.runs import DONE_MARKER
from tests.conftest import REPO_ROOT
from tests.results.tiny_configs import write_tiny_sweep

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
GLOBAL = "--trainer.callbacks+=lit_divnorm.global_batch.GlobalBatch"


def _run_one(config: Path, log_dir: Path, results: Path, *overrides: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LOCAL_RANK", None)
    command = [sys.executable, "-m", "lit_divnorm.experiments.sweep", "--run-one", str(config)]
    command += ["--log-dir", str(log_dir), "--results-dir", str(results), "--", *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)


def test_two_processes_at_batch_b_are_another_cell_than_one_process_at_b(tmp_path):
    folder = write_tiny_sweep(tmp_path, {"dn_star": {"name": "dn*", "sigma": 0.5}})
    config = folder / "dn_star.yaml"
    runs, results = tmp_path / "runs" / "cifar10" / "dn_star", tmp_path / "results"
    single = _run_one(config, runs / "version_0", results, "--trainer.accelerator=cpu")
    assert single.returncode == 0, single.stderr[-3000:]
    two = _run_one(config, runs / "version_1", results, *DDP)
    assert two.returncode == 0, two.stderr[-3000:]
    kept = _run_one(config, runs / "version_2", results, *DDP, GLOBAL)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert "global batch 8 = 2 processes x 4" in kept.stdout

    # results/ takes the rows of the config's own global batch 8; the 2 x 8 run stays out
    by_dir = {Path(r["source"]["run_dir"]).name: r for r in load_records(results).values()}
    assert sorted(by_dir) == ["version_0", "version_2"]
    assert (
        "not recorded in" in two.stdout and "its global batch is 16, the config's 8" in two.stdout
    )
    local = json.loads((runs / "version_1" / "record.json").read_text())
    batches = {
        name: (r["batch"]["world_size"], r["batch"]["per_device"], r["batch"]["global"])
        for name, r in {**by_dir, "version_1": local}.items()
    }
    assert batches == {"version_0": (1, 8, 8), "version_1": (2, 8, 16), "version_2": (2, 4, 8)}
    identity = {name: r["config_sha256"] for name, r in {**by_dir, "version_1": local}.items()}
    assert identity["version_0"] == identity["version_2"] != identity["version_1"]

    # a report of the run folders sees all three, and never averages 16 with 8
    out = write_report(None, [tmp_path / "runs"], tmp_path / "R.md", plots=False).read_text()
    (row,) = [line for line in out.splitlines() if line.startswith("| DN* |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    values = {f"{by_dir[name]['value']:.4f}" for name in by_dir}
    assert cells[2] == "1" and cells[1] in values  # seed 0 at global batch 8: one value
    assert "1 run(s) of another setting not averaged in (global batch 16 against 8)" in cells[5]

    # a process count that does not divide the global batch: refused, nothing trained
    odd = yaml.safe_load(config.read_text())
    odd["data"]["init_args"]["batch_size"] = 7
    odd_config = folder / "dn_star_odd.yaml"
    odd_config.write_text(yaml.safe_dump(odd))
    refused = _run_one(odd_config, tmp_path / "odd" / "version_0", results, *DDP, GLOBAL)
    assert refused.returncode != 0
    assert "the global batch data.batch_size=7 does not divide over 2 processes" in (
        refused.stdout + refused.stderr
    )
    assert not (tmp_path / "odd" / "version_0" / DONE_MARKER).exists()
    assert json.loads((runs / "version_2" / DONE_MARKER).read_text())["per_device_batch"] == 4
