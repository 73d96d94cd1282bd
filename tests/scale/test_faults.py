"""Faults: a non-finite loss or gradient stops training and names the layer; checkpoint
writes that fail or die half-way leave the previous checkpoint intact."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_divnorm.callbacks import NonFiniteDetector, NonFiniteError
from lit_divnorm.checkpoint import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    atomic_torch_save,
    load_checkpoint_safely,
)
from lit_divnorm.cli import main
from lit_divnorm.tasks.classification import ClassificationTask
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT
from tests.scale.helpers import PoisonAfter, SqrtOfZero

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
]


def _fit(model: nn.Module, steps: int = 6) -> ClassificationTask:
    task = ClassificationTask(arch=model, num_classes=4)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 4, 4, generator=generator), torch.arange(32) % 4)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NonFiniteDetector()],
    )
    trainer.fit(task, DataLoader(data, batch_size=4))
    return task


def _net(middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), middle, nn.ReLU(), nn.Linear(8, 4))


def test_non_finite_loss_names_the_step_and_the_first_layer():
    model = _net(PoisonAfter(calls=3))  # the 3rd training forward: global step 2
    with pytest.raises(NonFiniteError) as error:
        _fit(model)
    message = str(error.value)
    assert "global step 2 " in message and "batch 2" in message
    assert "first layer whose output went non-finite is 'model.2' (PoisonAfter)" in message
    assert "training loss is nan" in message
    # stopped before the optimizer stepped on the garbage: every weight is still finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_with_a_finite_loss_names_the_parameter():
    with pytest.raises(NonFiniteError) as error:
        _fit(_net(SqrtOfZero()))
    message = str(error.value)
    assert "global step 0 " in message
    assert "gradient of parameter 'model.1.weight' is not finite" in message


def test_a_healthy_run_is_not_stopped():
    task = _fit(_net(nn.Identity()), steps=4)
    assert task.trainer.global_step == 4


def test_cli_run_that_diverges_exits_3_with_one_paragraph(tmp_path, capsys):
    data = write_cifar10(tmp_path / "data", batches=(1,), n=16)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 6,
            "default_root_dir": str(tmp_path),
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "lit_divnorm.callbacks.NonFiniteDetector"}],
        },
        "data": {
            "class_path": "datamodules.cifar.CIFAR10DataModule",
            "init_args": {"data_dir": str(data), "batch_size": 4, "download": False},
        },
        "model": {
            "class_path": "lit_divnorm.tasks.classification.ClassificationTask",
            "init_args": {
                "norm": "dn*",
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e30}},
            },
        },
    }
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 3
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lit-divnorm:")]
    assert len(lines) == 1
    assert lines[0].startswith("lit-divnorm: training stopped: NonFiniteError: non-finite value")
    assert (
        "global step" in lines[0]
        and "first layer whose output went non-finite is 'model." in (lines[0])
    )


# -- atomic checkpoint writes ----------------------------------------------------------------


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_that_fails_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()

    def failing_save(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    assert path.read_bytes() == before
    assert load_checkpoint_safely(path)["global_step"] == 1
    assert _leftovers(path.parent) == []


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import os, torch
        from lit_divnorm.checkpoint import atomic_torch_save

        def dying_save(obj, stream, *args, **kwargs):
            stream.write(b"PK\\x03\\x04 half a checkpoint")
            stream.flush()
            os._exit(9)  # like SIGKILL: no cleanup runs

        torch.save = dying_save
        atomic_torch_save({{"global_step": 2}}, {str(path)!r})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 9
    assert path.read_bytes() == before  # the target was never touched
    assert len(_leftovers(tmp_path)) == 1  # the dead process's temporary file
    atomic_torch_save({"global_step": 3}, path)  # the next save removes it
    assert _leftovers(tmp_path) == []
    assert load_checkpoint_safely(path)["global_step"] == 3


def test_saved_file_has_the_usual_permissions(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"a": 1}, path)
    reference = tmp_path / "plain"
    reference.write_bytes(b"")
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)


class _RunsCode:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_load_from_checkpoint_does_not_run_code_from_the_file(tmp_path):
    """``Task.load_from_checkpoint`` reads through our weights-only reader (its message, not
    only torch's), refuses ``weights_only=False``, and so does every other entry point."""
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _RunsCode(str(tmp_path / "pwned"))}, evil)
    with pytest.raises(ValueError, match="will not run code"):
        ClassificationTask.load_from_checkpoint(evil)
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        ClassificationTask.load_from_checkpoint(evil, weights_only=False)
    with pytest.raises(ValueError, match="will not run code"):
        load_checkpoint_safely(evil)
    assert not (tmp_path / "pwned").exists()


def _saved_task(tmp_path, norm: str = "dn*"):
    torch.manual_seed(0)
    task = ClassificationTask(arch="small_cnn", norm=norm, num_classes=10)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.strategy.connect(task)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    return task, path


def test_load_from_checkpoint_restores_and_checks_the_configuration(tmp_path):
    task, path = _saved_task(tmp_path)
    restored = ClassificationTask.load_from_checkpoint(path)
    for key, value in task.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # Lightning merges the override into the saved hyper-parameters; the weights tell
    with pytest.raises(CheckpointMismatchError, match="weights missing from the checkpoint"):
        ClassificationTask.load_from_checkpoint(path, norm="bn")


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_cli_refuses_a_code_running_checkpoint_before_running_it(tmp_path, capsys, subcommand):
    data = write_cifar10(tmp_path / "data", batches=(1,), n=16)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _RunsCode(str(tmp_path / "pwned"))}, evil)
    args = [
        subcommand,
        "--model=lit_divnorm.tasks.classification.ClassificationTask",
        "--data=datamodules.cifar.CIFAR10DataModule",
        f"--data.data_dir={data}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--ckpt_path",
        str(evil),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "will not run code" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
