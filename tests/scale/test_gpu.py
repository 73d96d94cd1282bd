"""On a CUDA GPU: a DDP fit on one device with bfloat16 mixed precision and DN* (the Triton
kernels inside a Lightning step); device-resident batches drawn on the GPU against the CPU
DataLoader's; the compiled step with CUDA graphs against the eager curve. Skips without a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from datamodules.cifar import CIFAR10DataModule
from datamodules.ptb import PennTreebankDataModule
from datamodules.super_resolution import SuperResolutionDataModule
from lit_divnorm.tasks.classification import ClassificationTask
from lit_divnorm.tasks.language_model import LanguageModelTask
from tests.cifar.fixtures import write_cifar10
from tests.ptb.conftest import random_lines, write_corpus
from tests.sr.conftest import write_rgb

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
]


def test_ddp_on_one_gpu_with_bf16_mixed_and_dn_star(tmp_path):
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    task = ClassificationTask("small_cnn", num_classes=10, norm="dn*")
    before = [p.detach().clone() for p in task.parameters()]
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        strategy="ddp",
        precision="bf16-mixed",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=loader)
    loss = trainer.callback_metrics["train/loss_epoch"]
    assert torch.isfinite(loss)
    after = list(task.parameters())
    assert after[0].device.type == "cuda"
    assert any(not torch.equal(a.cpu(), b) for a, b in zip(after, before, strict=True))


def _cuda_trainer():
    strategy = SimpleNamespace(root_device=torch.device("cuda", 0))
    return SimpleNamespace(global_rank=0, world_size=1, strategy=strategy)


def test_device_resident_batches_on_the_gpu_are_the_dataloader_batches(tmp_path):
    """The hash of the crops and flips, the gathers and the order on the GPU give the CPU
    DataLoader's batches bit for bit (CIFAR with crops and flips, SR patches)."""
    root = write_cifar10(tmp_path / "cifar", batches=(1,), n=50)
    pairs = []
    for resident in (None, False):  # None: on, because the trainer's device is a GPU
        datamodule = CIFAR10DataModule(root, batch_size=16, preprocessing="resnet", seed=3)
        datamodule.device_resident = resident
        datamodule.trainer = _cuda_trainer()
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(2)
        pairs.append(list(loader))
    assert all(images.is_cuda and labels.is_cuda for images, labels in pairs[0])
    for (images, labels), (expected_images, expected_labels) in zip(*pairs, strict=True):
        assert torch.equal(images.cpu(), expected_images)
        assert torch.equal(labels.cpu(), expected_labels)
    (tmp_path / "sr").mkdir()
    for k in range(3):
        write_rgb(tmp_path / "sr" / f"{k}.png", 30, 33, seed=k)
    patches = []
    for resident in (True, False):
        datamodule = SuperResolutionDataModule(
            data_dir=str(tmp_path), train_dir="sr", val_dir="sr", test_dir="sr",
            allow_same_val_test=True, patch_size=15, patches_per_image=9, batch_size=5,
            device_resident=resident,
        )  # fmt: skip
        datamodule.trainer = _cuda_trainer()
        datamodule.setup("fit")
        patches.append(list(datamodule.train_dataloader()))
    for device_batch, loader_batch in zip(*patches, strict=True):
        for a, b in zip(device_batch, loader_batch, strict=True):
            assert a.is_cuda and torch.equal(a.cpu(), b)


def _curve(task, datamodule, steps: int) -> list[float]:
    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = Trainer(
        accelerator="gpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(task, datamodule=datamodule)
    return losses


def test_compiled_step_with_cuda_graphs_follows_the_eager_curve(tmp_path, monkeypatch):
    """compile=True on a GPU (inductor, CUDA graphs) over device-resident batches, and the
    LM's carried state through CUDA graph replays (the cudagraphs backend), against eager."""
    # the same convolution arithmetic in both runs
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    root = write_cifar10(tmp_path / "cifar", batches=(1,), n=64)
    curves = []
    for compile in (False, True):
        torch.manual_seed(0)
        task = ClassificationTask("small_cnn", norm="dn*", compile=compile)
        datamodule = CIFAR10DataModule(root, batch_size=16, preprocessing="resnet")
        curves.append(_curve(task, datamodule, 20))
        assert task.uses_cuda_graphs == compile
    torch.testing.assert_close(
        torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=5e-3, atol=1e-5
    )
    words = [f"w{i}" for i in range(29)] + ["<unk>"]
    lines = {
        s: random_lines(k, 60, words, (3, 9)) for k, s in enumerate(("train", "valid", "test"))
    }
    folder = write_corpus(tmp_path / "ptb", lines)
    curves = []
    for compile in (False, {"backend": "cudagraphs"}):
        torch.manual_seed(0)
        task = LanguageModelTask(
            vocab_size=31, hidden_sizes=(16, 16), norm="dn*", time_steps=4, compile=compile
        )
        datamodule = PennTreebankDataModule(str(folder), batch_size=4, bptt=4)
        curves.append(_curve(task, datamodule, 25))
        assert task.uses_cuda_graphs == bool(compile)
    torch.testing.assert_close(
        torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5
    )
