"""LanguageModelTask: the paper's loss, perplexity over an epoch, the carried hidden state,
the learning-rate schedule, and evaluation from a checkpoint with the saved vocabulary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torchmetrics.text import Perplexity as ReferencePerplexity

from datamodules.ptb import PennTreebankDataModule
from lit_divnorm.tasks.language_model import LanguageModelTask, Perplexity
from tests.ptb.conftest import write_corpus


def _task(**kwargs: object) -> LanguageModelTask:
    defaults: dict[str, object] = dict(vocab_size=13, cell="lstm", hidden_sizes=[8, 8])
    return LanguageModelTask(**{**defaults, **kwargs})


def _trainer(tmp_path: Path, **kwargs: object) -> Trainer:
    options: dict[str, object] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return Trainer(**{**options, **kwargs})


def test_loss_is_cross_entropy_summed_over_steps_and_averaged_over_batch() -> None:
    task = _task()
    inputs, targets = torch.randint(0, 13, (2, 4, 5))
    loss = task._shared_step((inputs, targets), "train")
    logits, _ = task.model(inputs)
    expected = (
        sum(
            F.cross_entropy(logits[n, t], targets[n, t], reduction="sum")
            for n in range(4)
            for t in range(5)
        )
        / 4
    )
    torch.testing.assert_close(loss, expected)


def test_perplexity_aggregates_tokens_over_batches() -> None:
    ours, reference = Perplexity(), ReferencePerplexity()
    for length in (3, 7, 1):  # uneven windows: a mean of per-batch perplexities would differ
        logits = torch.randn(2, length, 11) * 3
        targets = torch.randint(0, 11, (2, length))
        nll = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="sum")
        ours.update(nll, targets.numel())
        reference.update(logits, targets)
    torch.testing.assert_close(ours.compute(), reference.compute())


def test_state_is_carried_detached_and_reset() -> None:
    task = _task()
    tokens = torch.randint(0, 13, (3, 10))
    full_logits, _ = task.model(tokens)
    first, second = tokens[:, :5], tokens[:, 5:]
    task.on_train_epoch_start()
    task._shared_step((first, second), "train")
    state = task._states["train"]
    assert all(t.grad_fn is None for layer in state for t in layer)  # detached
    carried_logits, _ = task.model(second, state)
    torch.testing.assert_close(carried_logits, full_logits[:, 5:])  # a continuation
    task._shared_step((second, first), "train")  # the step itself uses the carried state
    task.on_train_epoch_start()
    assert "train" not in task._states
    # validation keeps its own state; a new epoch starts from zeros
    task._shared_step((first, second), "val")
    assert "val" in task._states and "train" not in task._states
    task.on_validation_epoch_start()
    assert "val" not in task._states


def test_without_carry_every_window_starts_from_zeros() -> None:
    task = _task(carry_state=False)
    tokens = torch.randint(0, 13, (3, 10))
    task._shared_step((tokens[:, :5], tokens[:, 1:6]), "val")
    loss = task._shared_step((tokens[:, 5:], tokens[:, 4:9]), "val")
    logits, _ = task.model(tokens[:, 5:])
    expected = F.cross_entropy(logits.reshape(-1, 13), tokens[:, 4:9].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, expected / 3)


def test_paper_schedule_halves_the_rate_every_epoch_from_the_fifth(tmp_path: Path) -> None:
    import yaml

    config = yaml.safe_load(Path("configs/ptb/lstm/baseline.yaml").read_text())["model"]
    schedule = config["init_args"]["lr_scheduler"]["init_args"]
    assert config["init_args"]["scheduler_interval"] == "epoch"
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, **schedule)
    rates = []
    for _ in range(13):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # the authors' rule: lr * 0.5 ** max(epoch + 1 - 4, 0), epochs counted from 0
    assert rates == [0.5 ** max(epoch + 1 - 4, 0) for epoch in range(13)]


def test_vocabulary_mismatch_is_reported(tiny_ptb: Path, tmp_path: Path) -> None:
    dm = PennTreebankDataModule(data_dir=str(tiny_ptb), batch_size=4, bptt=5)
    with pytest.raises(ValueError, match="vocab_size=13"):
        _trainer(tmp_path, max_steps=1).fit(_task(), datamodule=dm)


def test_checkpoint_evaluates_with_its_own_vocabulary(tiny_ptb: Path, tmp_path: Path) -> None:
    dm = PennTreebankDataModule(data_dir=str(tiny_ptb), batch_size=4, bptt=5, test_batch_size=2)
    task = _task(vocab_size=41, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=10, limit_val_batches=2)
    trainer.fit(task, datamodule=dm)
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    expected = trainer.test(task, datamodule=dm, verbose=False)[0]["test/ppl"]

    # a folder with only the test split, and a training split that would give another order
    lines = (tiny_ptb / "ptb.test.txt").read_text().splitlines()
    folder = write_corpus(tmp_path / "only_test", {"test": lines})
    fresh = PennTreebankDataModule(data_dir=str(folder), batch_size=4, bptt=5, test_batch_size=2)
    restored = LanguageModelTask.load_from_checkpoint(checkpoint)
    result = _trainer(tmp_path).test(restored, datamodule=fresh, ckpt_path=str(checkpoint))
    assert fresh.get_vocabulary() == dm.get_vocabulary()
    assert result[0]["test/ppl"] == pytest.approx(expected, rel=1e-5)


def _alternating_corpus(folder: Path) -> Path:
    """Lines ``a b a b ... a b`` (30 words) of two random distinct words out of 20.

    From the third word on, the next word is the one two steps back: a model that carries its
    state across windows knows it; one reset at every window boundary must guess it (1 in 20)
    right after each boundary.
    """
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20)]

    def lines(count: int) -> list[str]:
        return [" ".join(rng.sample(words, 2) * 15) for _ in range(count)]

    return write_corpus(folder, {"train": lines(300), "valid": lines(60), "test": lines(10)})


def test_carried_state_beats_reset_state_on_validation(tmp_path: Path) -> None:
    seed_everything(0)
    folder = _alternating_corpus(tmp_path / "alternating")
    dm = PennTreebankDataModule(data_dir=str(folder), batch_size=16, bptt=4)
    dm.setup("fit")
    task = LanguageModelTask(
        vocab_size=dm.vocab_size,
        cell="lstm",
        hidden_sizes=[24],
        optimizer=lambda p: torch.optim.Adam(p, lr=0.02),
    )
    trainer = _trainer(tmp_path, max_epochs=3, gradient_clip_val=5.0, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    carried = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/ppl"]
    task.carry_state = False
    reset = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/ppl"]
    # ideal: exp((ln 20 + ln 19) / 31) = 1.21 carried; a reset adds ~ln 20 every 4 words
    # (ideal ~2.5); after this short training: about 2.1 carried and 4.8 reset
    assert carried < 3.0
    assert reset > 1.5 * carried
