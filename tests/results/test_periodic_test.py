"""PeriodicTest: the test split every N steps, by step in metrics.csv, equal to the tasks' own
test loop at the same weights, with training left exactly as without it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel

from datamodules.cifar import CIFAR10DataModule
from datamodules.ptb import PennTreebankDataModule
from datamodules.super_resolution import SuperResolutionDataModule
from lit_divnorm.callbacks import PeriodicTest, ResumeCheckpoint
from lit_divnorm.runs import RunCSVLogger
from lit_divnorm.tasks import ClassificationTask, LanguageModelTask, SuperResolutionTask
from tests.cifar.fixtures import write_cifar10
from tests.ptb.conftest import random_lines, write_corpus
from tests.sr.conftest import write_rgb

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def _trainer(tmp_path: Path, max_steps: int, callbacks: list, **kwargs) -> Trainer:
    options = dict(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=RunCSVLogger(str(tmp_path), name="run", version="v"),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ResumeCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    return Trainer(**{**options, **kwargs})


def _rows(tmp_path: Path, metric: str) -> dict[int, float]:
    path = tmp_path / "run" / "v" / "metrics.csv"
    with path.open(newline="") as handle:
        return {int(r["step"]): float(r[metric]) for r in csv.DictReader(handle) if r.get(metric)}


def _cifar(tmp_path: Path) -> CIFAR10DataModule:
    folder = write_cifar10(tmp_path / "data", batches=(1,), n=32)
    return CIFAR10DataModule(
        data_dir=str(folder), batch_size=8, num_workers=0, val_size=0, download=False
    )


def _classifier() -> ClassificationTask:
    seed_everything(0)
    # bn and dropout: a test in training mode would differ and would move the running stats
    return ClassificationTask("small_cnn", num_classes=10, norm="bn", dropout=0.5)


def test_classifier_test_every_n_steps_matches_the_task_test_and_leaves_training_alone(tmp_path):
    with_test = _classifier()
    trainer = _trainer(tmp_path / "a", 6, [PeriodicTest(every_n_steps=2)])
    trainer.fit(with_test, datamodule=_cifar(tmp_path / "a"))
    logged = _rows(tmp_path / "a", "test/acc")
    losses = _rows(tmp_path / "a", "test/loss")
    assert sorted(logged) == [2, 4, 6]  # after 2, 4 and 6 optimizer steps
    # reference: the same network trained without the callback for S steps, then the task's
    # own test loop (torchmetrics accuracy, the logged mean cross-entropy)
    for steps in (2, 4, 6):
        plain = _classifier()
        plain_trainer = _trainer(tmp_path / f"p{steps}", steps, [])
        data = _cifar(tmp_path / f"p{steps}")
        plain_trainer.fit(plain, datamodule=data)
        (expected,) = plain_trainer.test(plain, datamodule=data, verbose=False)
        assert logged[steps] == pytest.approx(expected["test/acc"], abs=1e-7)
        assert losses[steps] == pytest.approx(expected["test/loss"], rel=1e-5)
    for name, value in with_test.state_dict().items():  # the callback changed no weight
        torch.testing.assert_close(value, plain.state_dict()[name], rtol=0, atol=0, msg=name)
    assert with_test.training  # and the model is back in training mode after the last test


def test_a_run_resumed_at_an_evaluation_step_evaluates_it_again(tmp_path):
    first = _trainer(tmp_path / "a", 4, [PeriodicTest(2), ResumeCheckpoint(every_n_train_steps=2)])
    first.fit(_classifier(), datamodule=_cifar(tmp_path / "a"))
    checkpoint = next((tmp_path / "a").rglob("last.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    second = _trainer(tmp_path / "b", 6, [PeriodicTest(2), ResumeCheckpoint(every_n_train_steps=2)])
    second.fit(_classifier(), datamodule=_cifar(tmp_path / "b"), ckpt_path=str(checkpoint))
    resumed = _rows(tmp_path / "b", "test/acc")
    assert sorted(resumed) == [4, 6]  # step 4 again: the resumed metrics.csv drops its row
    assert resumed[4] == pytest.approx(_rows(tmp_path / "a", "test/acc")[4], abs=1e-7)


def test_language_model_perplexity_matches_the_task_test(tmp_path):
    words = [f"w{i}" for i in range(39)] + ["<unk>"]
    splits = {"train": (0, 120), "valid": (1, 10), "test": (2, 30)}
    lines = {name: random_lines(seed, n, words, (3, 12)) for name, (seed, n) in splits.items()}
    corpus = write_corpus(tmp_path / "ptb", lines)
    data = PennTreebankDataModule(data_dir=str(corpus), batch_size=4, bptt=5, test_batch_size=2)
    task = LanguageModelTask(vocab_size=41, cell="lstm", hidden_sizes=[8], norm="dn*")
    trainer = _trainer(tmp_path, 3, [PeriodicTest(3)], limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    logged = _rows(tmp_path, "test/ppl")
    (expected,) = trainer.test(task, datamodule=data, verbose=False)  # state carried, batch 2
    assert list(logged) == [3]
    assert logged[3] == pytest.approx(expected["test/ppl"], rel=1e-5)


def test_super_resolution_psnr_and_ssim_match_the_task_test(tmp_path):
    for index, (folder, height, width) in enumerate(
        [("train", 40, 45), ("train", 50, 37), ("eval", 41, 38), ("test", 33, 35), ("test", 30, 44)]
    ):
        (tmp_path / folder).mkdir(exist_ok=True)
        write_rgb(tmp_path / folder / f"{index}.png", height, width, index)
    data = SuperResolutionDataModule(
        data_dir=str(tmp_path),
        train_dir="train",
        val_dir="eval",
        test_dir="test",
        scale=3,
        patches_per_image=4,
        batch_size=4,
    )
    task = SuperResolutionTask(num_images_to_show=0)
    trainer = _trainer(tmp_path / "out", 2, [PeriodicTest(2)], limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    (expected,) = trainer.test(task, datamodule=data, verbose=False)
    for metric in ("test/psnr", "test/ssim"):
        assert _rows(tmp_path / "out", metric) == {2: pytest.approx(expected[metric], rel=1e-6)}


def test_bad_arguments_and_unsupported_modules_are_refused(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        PeriodicTest(0)
    with pytest.raises(TypeError, match="every_n_steps must be an int, got '5'"):
        PeriodicTest("5")
    model: LightningModule = BoringModel()
    with pytest.raises(TypeError, match="got BoringModel"):
        _trainer(tmp_path, 1, [PeriodicTest(1)]).fit(model)
