"""Kill a training run (SIGTERM, SIGKILL) in a subprocess inside an epoch, resume it with
``--ckpt_path last`` and check it ends exactly where an uninterrupted run with the same seed
ends.

CIFAR: the fixture's 32 images, batch 8 (4 steps an epoch), 3 epochs, small CNN with dn* and
dropout 0.5, ``resnet`` preprocessing (random crops and flips), so the data order, the
augmentation and the dropout masks all depend on the restored state; the killed and resumed
runs read the data with 2 worker processes, the uninterrupted one in the main process.
``ResumeCheckpoint(every_n_train_steps=3)`` saves at steps 3, 6, 9, 12 and at every epoch end
(4, 8, 12); the killed runs stop after step 7, so ``last.ckpt`` is step 6, inside epoch 1
(SIGKILL), or step 7 itself (SIGTERM: the run saves where it stops).

PTB: a tiny corpus, 4 streams, bptt 5 (11 windows an epoch), 2 epochs, an LSTM whose hidden
state is carried from window to window; checkpoints every 4 steps, killed at step 6 (last
checkpoint: step 4, inside epoch 0: the stream position and the carried state matter).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.order import ResumableLoader
from lit_divnorm.checkpoint import AtomicCheckpointIO, load_checkpoint_safely
from lit_divnorm.cli import main
from lit_divnorm.tasks.language_model import LanguageModelTask
from tests.cifar.fixtures import write_cifar10
from tests.conftest import REPO_ROOT
from tests.ptb.conftest import random_lines, write_corpus

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
]
EPOCHS = 3
KILL_AFTER_STEP = 7


def _config(
    tmp: Path, data: Path, run: str, extra_callbacks: list | None = None, workers: int = 2
) -> Path:
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
                    "init_args": {"dirpath": str(tmp / run / "ckpt"), "every_n_train_steps": 3},
                },
                *(extra_callbacks or []),
            ],
        },
        "data": {
            "class_path": "datamodules.cifar.CIFAR10DataModule",
            "init_args": {
                "data_dir": str(data),
                "batch_size": 8,
                "download": False,
                "preprocessing": "resnet",
                "num_workers": workers,
            },
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
    cli = main(["fit", "--config", str(_config(tmp, data, "whole", workers=0))])
    torch.set_num_threads(threads)
    whole = {
        "state": {k: v.clone() for k, v in cli.model.state_dict().items()},
        "metrics": dict(cli.trainer.callback_metrics),
        "step": cli.trainer.global_step,
    }
    return tmp, data, whole


def _kill_and_resume(tmp: Path, data: Path, run: str, signum: int, capsys) -> dict:
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
    shutil.copy(tmp / run / "ckpt" / "last.ckpt", tmp / f"{run}.at_kill.ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    capsys.readouterr()
    cli = main(["fit", "--config", str(_config(tmp, data, run)), "--ckpt_path", "last"])
    torch.set_num_threads(threads)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lit-divnorm")]
    resumed = {
        "state": cli.model.state_dict(),
        "metrics": dict(cli.trainer.callback_metrics),
        "step": cli.trainer.global_step,
        "killed_step": saved["global_step"],
        "killed_epoch": saved["epoch"],
        "returncode": returncode,
        "stderr": stderr,
        "said": said,
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
def test_killed_run_resumes_to_the_uninterrupted_result(setting, signum, capsys):
    tmp, data, whole = setting
    run = f"killed_{signum.name}"
    resumed = _kill_and_resume(tmp, data, run, signum, capsys)
    if signum == signal.SIGKILL:
        assert resumed["returncode"] == -signal.SIGKILL
        # the killed run's last checkpoint is step 6, inside epoch 1 (steps 5-8), not step 7
        step = 6
    else:  # the step ends, last.ckpt is saved at it; the CLI says so and exits 128 + 15
        assert resumed["returncode"] == 143
        assert "stopped by SIGTERM at step 7" in resumed["stderr"]
        assert "--ckpt_path last" in resumed["stderr"]
        step = KILL_AFTER_STEP  # the step it stopped at, inside epoch 1 (steps 5-8)
    assert (resumed["killed_step"], resumed["killed_epoch"]) == (step, 1)
    assert resumed["said"] == [
        f"lit-divnorm: resuming from {tmp / run / 'ckpt' / 'last.ckpt'} (step {step})"
    ]
    _assert_same_end(resumed, whole)


def test_resume_without_the_data_position_would_differ(setting, monkeypatch):
    """Control: the same mid-epoch resume with the loader's saved position ignored (the epoch
    replayed from its first batch, as a plain DataLoader does) ends elsewhere."""
    tmp, data, whole = setting
    killed = sorted(tmp.glob("*.at_kill.ckpt"))  # step 6, left by the tests above
    if not killed:
        pytest.skip("needs the checkpoint of a killed run (run the whole module)")
    monkeypatch.setattr(ResumableLoader, "load_state_dict", lambda self, state: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = _config(tmp, data, "control")
    cli = main(["fit", "--config", str(config), "--ckpt_path", str(killed[0])])
    torch.set_num_threads(threads)
    assert cli.trainer.global_step == whole["step"]
    with pytest.raises(AssertionError):
        _assert_same_end({"state": cli.model.state_dict(), "metrics": {}, "step": 12}, whole)


def test_resume_from_a_later_epoch_would_differ(setting):
    """Control: the comparison can fail (a run of one more epoch ends elsewhere)."""
    tmp, data, whole = setting
    config = _config(tmp, data, "longer")
    cli = main(["fit", "--config", str(config), f"--trainer.max_epochs={EPOCHS + 1}"])
    with pytest.raises(AssertionError):
        _assert_same_end({"state": cli.model.state_dict(), "metrics": {}, "step": 12}, whole)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ("--trainer.max_epochs=2", [(3, 0), (4, 0), (6, 1), (8, 1)]),  # every 3, epoch ends
        ("--trainer.max_steps=5", [(3, 0), (4, 0), (5, 1)]),  # and the final step, mid-epoch
    ],
)
def test_checkpoints_every_n_steps_at_epoch_ends_and_the_end(
    tmp_path, monkeypatch, limit, expected
):
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
            limit,
            "--trainer.callbacks.init_args.every_n_train_steps=3",
        ]
    )
    assert saved == expected
    assert sorted(p.name for p in (tmp_path / "every3" / "ckpt").iterdir()) == ["last.ckpt"]


# -- Penn Treebank: the stream position and the carried hidden state -------------------------

PTB_EPOCHS = 2
PTB_EVERY = 4
PTB_KILL_AT = 6  # SIGKILL at the start of the batch after step 6: last.ckpt is step 4


def _ptb_config(tmp: Path, corpus: Path, run: str, kill_at: int | None = None) -> Path:
    callbacks = [
        {
            "class_path": "lit_divnorm.callbacks.ResumeCheckpoint",
            "init_args": {"dirpath": str(tmp / run / "ckpt"), "every_n_train_steps": PTB_EVERY},
        }
    ]
    if kill_at is not None:
        kill = {"class_path": "tests.scale.helpers.KillAt", "init_args": {"step": kill_at}}
        callbacks.append(kill)
    config = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": PTB_EPOCHS,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp / run),
            "callbacks": callbacks,
        },
        "data": {
            "class_path": "datamodules.ptb.PennTreebankDataModule",
            "init_args": {"data_dir": str(corpus), "batch_size": 4, "bptt": 5, "download": False},
        },
        "model": {
            "class_path": "lit_divnorm.tasks.language_model.LanguageModelTask",
            "init_args": {"vocab_size": 41, "cell": "lstm", "hidden_sizes": [8], "norm": "ln"},
        },
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit_in_process(config: Path, *extra: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with one thread: same arithmetic
    try:
        return main(["fit", "--config", str(config), *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ptb_setting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ptb_resume")
    words = [f"w{i}" for i in range(39)] + ["<unk>"]
    lines = {split: random_lines(seed, 40, words, (3, 9)) for seed, split in enumerate(
        ("train", "valid", "test")
    )}  # fmt: skip
    corpus = write_corpus(tmp / "ptb", lines)
    cli = _fit_in_process(_ptb_config(tmp, corpus, "whole"))
    windows = len(cli.datamodule.train_dataloader())
    assert PTB_EVERY < PTB_KILL_AT < windows  # the checkpoint and the kill are inside epoch 0
    whole = {k: v.clone() for k, v in cli.model.state_dict().items()}
    return tmp, corpus, whole, cli.trainer.global_step


def test_killed_ptb_run_resumes_inside_an_epoch_to_the_uninterrupted_result(ptb_setting):
    tmp, corpus, whole, steps = ptb_setting
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    killed = _ptb_config(tmp, corpus, "killed", kill_at=PTB_KILL_AT)
    result = subprocess.run(
        [sys.executable, "-m", "lit_divnorm.cli", "fit", "--config", str(killed)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    saved = load_checkpoint_safely(tmp / "killed" / "ckpt" / "last.ckpt")
    assert (saved["global_step"], saved["epoch"]) == (PTB_EVERY, 0)
    assert saved["carried_state"] is not None  # the LSTM state after window 4
    shutil.copy(tmp / "killed" / "ckpt" / "last.ckpt", tmp / "ptb_at_kill.ckpt")
    cli = _fit_in_process(_ptb_config(tmp, corpus, "killed"), "--ckpt_path", "last")
    assert cli.trainer.global_step == steps
    state = cli.model.state_dict()
    assert state.keys() == whole.keys()
    for key, value in whole.items():
        assert torch.equal(state[key], value), key


def test_ptb_resume_without_the_carried_state_would_differ(ptb_setting, monkeypatch):
    """Control: the same resume starting the next window from a zero state ends elsewhere."""
    tmp, corpus, whole, _ = ptb_setting
    if not (tmp / "ptb_at_kill.ckpt").is_file():
        pytest.skip("needs the checkpoint of the killed PTB run (run the whole module)")
    original = LanguageModelTask.on_load_checkpoint

    def forget_state(self, checkpoint):
        original(self, {**checkpoint, "carried_state": None})

    monkeypatch.setattr(LanguageModelTask, "on_load_checkpoint", forget_state)
    config = _ptb_config(tmp, corpus, "control")
    cli = _fit_in_process(config, "--ckpt_path", str(tmp / "ptb_at_kill.ckpt"))
    state = cli.model.state_dict()
    assert not all(torch.equal(state[key], value) for key, value in whole.items())
