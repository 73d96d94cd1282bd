"""Kill a training run (SIGTERM, SIGKILL) in a subprocess, resume it with ``--ckpt_path last``
and check it ends exactly where an uninterrupted run with the same seed ends.

Run: CIFAR-10 fixture, 32 images, batch 8 (4 steps an epoch), 3 epochs, small CNN with dn*
and dropout 0.5 (so the shuffle and the dropout masks both depend on the RNG state).
``ResumeCheckpoint(every_n_train_steps=4)`` saves at steps 4, 8, 12 and at every epoch end;
the killed runs stop after step 5, so ``last.ckpt`` is the end of epoch 0 (step 4).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_divnorm.checkpoint import AtomicCheckpointIO, load_checkpoint_safely
from lit_divnorm.cli import main
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
]
EPOCHS = 3
KILL_AFTER_STEP = 5


def _config(tmp: Path, data: Path, run: str, extra_callbacks: list | None = None) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": EPOCHS,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp / run),
            "callbacks": [
                {
                    "class_path": "lit_divnorm.callbacks.ResumeCheckpoint",
                    "init_args": {"dirpath": str(tmp / run / "ckpt"), "every_n_train_steps": 4},
                },
                *(extra_callbacks or []),
            ],
        },
        "data": {
            "class_path": "datamodules.cifar.CIFAR10DataModule",
            "init_args": {"data_dir": str(data), "batch_size": 8, "download": False},
        },
        "model": {
            "class_path": "lit_divnorm.tasks.classification.ClassificationTask",
            "init_args": {"arch": "small_cnn", "norm": "dn*", "dropout": 0.5},
        },
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = write_cifar10(tmp / "data", batches=(1,), n=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with one thread: same arithmetic
    cli = main(["fit", "--config", str(_config(tmp, data, "whole"))])
    torch.set_num_threads(threads)
    whole = {
        "state": {k: v.clone() for k, v in cli.model.state_dict().items()},
        "metrics": dict(cli.trainer.callback_metrics),
        "step": cli.trainer.global_step,
    }
    return tmp, data, whole


def _kill_and_resume(tmp: Path, data: Path, run: str, signum: int) -> tuple[dict, dict, int]:
    marker = tmp / f"{run}.paused"
    pause = {
        "class_path": "tests.scale.helpers.PauseAt",
        "init_args": {"step": KILL_AFTER_STEP, "marker": str(marker)},
    }
    killed_config = _config(tmp, data, run, [pause])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "lit_divnorm.cli", "fit", "--config", str(killed_config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the kill step"
        time.sleep(0.05)
    process.send_signal(signum)
    returncode = process.wait(timeout=60)
    stderr = process.stderr.read().decode()
    process.stderr.close()
    saved = load_checkpoint_safely(tmp / run / "ckpt" / "last.ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cli = main(["fit", "--config", str(_config(tmp, data, run)), "--ckpt_path", "last"])
    torch.set_num_threads(threads)
    resumed = {
        "state": cli.model.state_dict(),
        "metrics": dict(cli.trainer.callback_metrics),
        "step": cli.trainer.global_step,
        "killed_step": saved["global_step"],
        "killed_epoch": saved["epoch"],
        "returncode": returncode,
        "stderr": stderr,
    }
    return resumed


def _assert_same_end(resumed: dict, whole: dict) -> None:
    assert resumed["step"] == whole["step"] == EPOCHS * 4
    assert resumed["state"].keys() == whole["state"].keys()
    for key, value in whole["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for name in ("train/loss_epoch", "train/acc_epoch"):
        torch.testing.assert_close(resumed["metrics"][name], whole["metrics"][name])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_run_resumes_to_the_uninterrupted_result(setting, signum):
    tmp, data, whole = setting
    resumed = _kill_and_resume(tmp, data, f"killed_{signum.name}", signum)
    if signum == signal.SIGKILL:
        assert resumed["returncode"] == -signal.SIGKILL
    else:  # Lightning stops at the batch boundary; the CLI says so and exits 128 + 15
        assert resumed["returncode"] == 143
        assert "received SIGTERM" in resumed["stderr"] and "--ckpt_path last" in resumed["stderr"]
    # the killed run's last checkpoint is the end of epoch 0, not its last step (5)
    assert (resumed["killed_step"], resumed["killed_epoch"]) == (4, 0)
    _assert_same_end(resumed, whole)


def test_resume_from_a_later_epoch_would_differ(setting):
    """Control: the comparison can fail (a run of one more epoch ends elsewhere)."""
    tmp, data, whole = setting
    config = _config(tmp, data, "longer")
    cli = main(["fit", "--config", str(config), f"--trainer.max_epochs={EPOCHS + 1}"])
    with pytest.raises(AssertionError):
        _assert_same_end({"state": cli.model.state_dict(), "metrics": {}, "step": 12}, whole)


def test_checkpoints_every_n_steps_and_at_epoch_end(tmp_path, monkeypatch):
    data = write_cifar10(tmp_path / "data", batches=(1,), n=32)
    saved: list[tuple[int, int]] = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append((checkpoint["global_step"], checkpoint["epoch"]))
        original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    config = _config(tmp_path, data, "every3")
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs=2",
            "--trainer.callbacks.init_args.every_n_train_steps=3",
        ]
    )
    # steps 3, 6 (every 3) and epoch ends at steps 4, 8
    assert saved == [(3, 0), (4, 0), (6, 1), (8, 1)]
    assert sorted(p.name for p in (tmp_path / "every3" / "ckpt").iterdir()) == ["last.ckpt"]
