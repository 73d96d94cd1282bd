"""``configs/trainer/{cpu,gpu,ddp,slurm}.yaml`` merge into an experiment config and say what
the issue asks: where to run, DDP with synchronized batch statistics for multi-GPU, and a
resumable checkpoint (``ResumeCheckpoint``) in every one of them."""

from __future__ import annotations

import pytest
import torch
import yaml

from lit_divnorm.callbacks import ResumeCheckpoint
from lit_divnorm.checkpoint import AtomicCheckpointIO
from lit_divnorm.cli import main
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
]
EXPERIMENT = str(REPO_ROOT / "configs" / "cifar10" / "dn_star.yaml")
# file: (accelerator, strategy, sync_batchnorm, num_nodes > 1)
EXPECTED = {
    "cpu": ("cpu", "auto", False, False),
    "gpu": ("gpu", "auto", False, False),
    "ddp": ("gpu", "ddp", True, False),
    "slurm": ("gpu", "ddp", True, True),
}


def _trainer_file(name: str) -> str:
    return str(REPO_ROOT / "configs" / "trainer" / f"{name}.yaml")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_trainer_file_merges_into_an_experiment(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", EXPERIMENT, "--trainer", _trainer_file(name), "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    accelerator, strategy, sync, multi_node = EXPECTED[name]
    assert (trainer["accelerator"], trainer["strategy"]) == (accelerator, strategy)
    assert trainer["sync_batchnorm"] is sync
    assert (trainer["num_nodes"] > 1) is multi_node
    assert trainer["max_steps"] == 80000  # the experiment's schedule is kept
    callbacks = [c["class_path"] for c in trainer["callbacks"]]
    assert "lit_divnorm.callbacks.ResumeCheckpoint" in callbacks
    # no fixed folder: the CLI names the run after the experiment config (test_run_folders)
    assert trainer["logger"]["class_path"] == "lit_divnorm.runs.RunCSVLogger"
    assert trainer["logger"]["init_args"]["name"] in (None, "lightning_logs")
    assert trainer["logger"]["init_args"]["version"] is None


def _fast_dev_run(name: str, tmp_path) -> object:
    data = write_cifar10(tmp_path / "data", batches=(1,), n=16)
    return main(
        [
            "fit",
            "--config",
            EXPERIMENT,
            "--trainer",
            _trainer_file(name),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--data.data_dir={data}",
            "--data.num_workers=0",
            "--data.batch_size=8",
        ]
    )


def test_cpu_file_runs(tmp_path):
    cli = _fast_dev_run("cpu", tmp_path)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, ResumeCheckpoint) for c in cli.trainer.callbacks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gpu", "ddp"])
def test_gpu_files_run(name, tmp_path):
    cli = _fast_dev_run(name, tmp_path)
    assert cli.trainer.global_step == 1
    assert next(cli.model.parameters()).device.type == "cuda"


def _experiment_configs() -> list:
    root = REPO_ROOT / "configs"
    return [
        path
        for path in sorted(root.rglob("*.yaml"))
        if not any(part.startswith("_") for part in path.relative_to(root).parts)
        and path.relative_to(root).parts[0] != "trainer"
    ]


def test_every_experiment_config_runs_on_one_device():
    """No config inherits "every GPU of the node": each names devices 1 (its trainer fragment
    does), so a plain fit on an 8-GPU node trains on the paper's batch, not 8 times it."""
    configs = _experiment_configs()
    assert len(configs) > 60
    for path in configs:
        trainer = yaml.safe_load(path.read_text())["trainer"]
        if isinstance(trainer, str):
            trainer = yaml.safe_load((path.parent / trainer).read_text())
        assert trainer.get("devices") == 1, f"{path}: devices {trainer.get('devices')!r}"


@pytest.mark.parametrize("name", ["ddp", "slurm"])
def test_multi_device_files_keep_the_global_batch(name):
    trainer = yaml.safe_load(open(_trainer_file(name)))
    callbacks = [callback["class_path"] for callback in trainer["callbacks"]]
    assert "lit_divnorm.global_batch.GlobalBatch" in callbacks
    # the example in slurm.yaml: 2 nodes x 2 GPUs divide CIFAR's 100 and PTB's 20
    if name == "slurm":
        processes = trainer["devices"] * trainer["num_nodes"]
        assert 100 % processes == 0 and 20 % processes == 0
