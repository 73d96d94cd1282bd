"""Runs are named by their experiment config, whatever trainer file is added; ``--ckpt_path
last`` continues the experiment's latest run and says so in one line; nothing overwrites or
deletes another run's files (``lit_divnorm.runs``, ``DivNormCLI``).

Each run: the CIFAR-10 fixture (16 images, batch 8: 2 steps an epoch), the small CNN,
``configs/trainer/cpu.yaml`` added after the experiment, run from a temporary working folder
so that the trainer file's relative ``runs/`` lands there.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from lit_divnorm.checkpoint import load_checkpoint_safely
from lit_divnorm.cli import main
from lit_divnorm.runs import SUPERSEDED_METRICS, RunCSVLogger
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
]
CPU_TRAINER = str(REPO_ROOT / "configs" / "trainer" / "cpu.yaml")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    data = write_cifar10(tmp_path / "data", batches=(1,), n=16)
    folder = tmp_path / "configs" / "cifar10"
    folder.mkdir(parents=True)
    for name, norm in (("dn_star", "dn*"), ("bn", "bn")):
        config = {
            "seed_everything": 0,
            "trainer": {
                "max_steps": 4,
                "log_every_n_steps": 1,
                "enable_progress_bar": False,
                "enable_model_summary": False,
            },
            "data": {
                "class_path": "datamodules.cifar.CIFAR10DataModule",
                "init_args": {"data_dir": str(data), "batch_size": 8, "download": False},
            },
            "model": {
                "class_path": "lit_divnorm.tasks.classification.ClassificationTask",
                "init_args": {"arch": "small_cnn", "norm": norm},
            },
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    return tmp_path


def _fit(name: str, *extra: str, capsys=None):
    if capsys is not None:
        capsys.readouterr()
    config = f"configs/cifar10/{name}.yaml"
    cli = main(["fit", "--config", config, "--trainer", CPU_TRAINER, *extra])
    said = []
    if capsys is not None:
        said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("lit-divnorm")]
    return cli, said


def _step(run_dir: Path) -> int:
    return load_checkpoint_safely(run_dir / "checkpoints" / "last.ckpt")["global_step"]


def test_two_experiments_with_one_trainer_file_end_in_two_complete_folders(workdir):
    first, _ = _fit("dn_star")
    second, _ = _fit("bn")
    runs = workdir / "runs" / "cifar10"
    assert Path(first.trainer.log_dir) == Path("runs/cifar10/dn_star/version_0")
    assert Path(second.trainer.log_dir) == Path("runs/cifar10/bn/version_0")
    for name, norm in (("dn_star", "dn*"), ("bn", "bn")):
        run = runs / name / "version_0"
        assert _step(run) == 4
        saved = load_checkpoint_safely(run / "checkpoints" / "last.ckpt")
        assert saved["hyper_parameters"]["norm"] == norm
        saved_config = yaml.safe_load((run / "config.yaml").read_text())
        assert saved_config["model"]["init_args"]["norm"] == norm
        steps = {int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())}
        assert steps == {0, 1, 2, 3}
    assert sorted(p.name for p in runs.iterdir()) == ["bn", "dn_star"]


def test_the_same_command_again_is_a_new_version_and_last_resumes_the_latest(workdir, capsys):
    _fit("dn_star")
    first = workdir / "runs/cifar10/dn_star/version_0"
    before = {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    again, _ = _fit("dn_star")
    assert Path(again.trainer.log_dir).name == "version_1"
    assert {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    resumed, said = _fit("dn_star", "--ckpt_path", "last", "--trainer.max_steps=6", capsys=capsys)
    latest = Path("runs/cifar10/dn_star/version_1")
    assert said == [f"lit-divnorm: resuming from {latest / 'checkpoints' / 'last.ckpt'} (step 4)"]
    assert Path(resumed.trainer.log_dir) == latest and resumed.trainer.global_step == 6
    assert _step(workdir / latest) == 6
    rows = list(csv.DictReader((workdir / latest / "metrics.csv").open()))
    assert sorted({int(r["step"]) for r in rows}) == [0, 1, 2, 3, 4, 5]  # the old rows kept


def test_last_without_a_checkpoint_says_so_and_starts_at_step_0(workdir, capsys):
    cli, said = _fit("bn", "--ckpt_path", "last", capsys=capsys)
    assert said == [
        "lit-divnorm: --ckpt_path last: no checkpoint in runs/cifar10/bn/version_0; "
        "starting at step 0"
    ]
    assert cli.trainer.global_step == 4


def test_a_named_version_resumes_and_a_new_run_never_writes_into_it(workdir, capsys):
    version = "--trainer.logger.init_args.version=job-17"  # e.g. $SLURM_JOB_NAME
    _fit("dn_star", version)
    run = workdir / "runs/cifar10/dn_star/job-17"
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        _fit("dn_star", version, capsys=capsys)
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    cli, said = _fit(
        "dn_star", version, "--ckpt_path", "last", "--trainer.max_steps=6", capsys=capsys
    )
    checkpoint = Path("runs/cifar10/dn_star/job-17/checkpoints/last.ckpt")
    assert said == [f"lit-divnorm: resuming from {checkpoint} (step 4)"]
    assert Path(cli.trainer.log_dir).name == "job-17" and _step(run) == 6


def test_test_subcommand_takes_the_latest_runs_checkpoint_and_logs_apart(workdir, capsys):
    with pytest.raises(SystemExit):  # nothing to test yet: refused, not run on random weights
        main(["test", "--config", "configs/cifar10/bn.yaml", "--ckpt_path", "last"])
    assert "no checkpoint of this experiment to test" in capsys.readouterr().err
    _fit("bn")
    capsys.readouterr()
    cli = main(["test", "--config", "configs/cifar10/bn.yaml", "--ckpt_path", "last"])
    checkpoint = Path("runs/cifar10/bn/version_0/checkpoints/last.ckpt")
    assert f"lit-divnorm: test with {checkpoint} (step 4)" in capsys.readouterr().out
    assert Path(cli.trainer.log_dir) == Path("runs/cifar10/bn/test_0")
    assert "test/acc" in (workdir / "runs/cifar10/bn/test_0/metrics.csv").read_text()


def test_run_csv_logger_keeps_old_rows_and_moves_rows_after_the_resumed_step(tmp_path):
    first = RunCSVLogger(tmp_path, name="exp", version="v")
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"val/acc": 0.5}, step=2)
    first.save()
    resumed = RunCSVLogger(tmp_path, name="exp", version="v")
    resumed.supersede_from(3)  # a checkpoint at step 3: rows 3, 4 are logged again
    resumed.log_metrics({"train/loss": 30.0, "train/acc": 1.0}, step=3)
    resumed.save()
    rows = list(csv.DictReader((tmp_path / "exp" / "v" / "metrics.csv").open()))
    assert [(r["step"], r["train/loss"], r["val/acc"], r["train/acc"]) for r in rows] == [
        ("0", "0.0", "", ""),
        ("1", "1.0", "", ""),
        ("2", "2.0", "", ""),
        ("2", "", "0.5", ""),
        ("3", "30.0", "", "1.0"),
    ]
    moved = list(csv.DictReader((tmp_path / "exp" / "v" / SUPERSEDED_METRICS).open()))
    assert [(r["step"], r["train/loss"]) for r in moved] == [("3", "3.0"), ("4", "4.0")]
