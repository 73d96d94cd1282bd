"""Device-resident data (``device_resident=True``, forced on the CPU) against the DataLoader path.

The reference is each datamodule's ``DataLoader`` path (tested on its own against torch's
``DistributedSampler``, explicit crops of the padded image, slices of the degraded images and
the streams cut by hand): the device path must give the very same batches, bit for bit, for
every split, in every epoch, on every simulated DDP rank, and continue a checkpointed position
with the batches the uninterrupted epoch would have given. A Lightning run then shows that the
fit loop sets the epochs, stores the position in checkpoints, resumes mid-epoch and hands the
drawn tensors to ``training_step`` untouched (no copy).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data.distributed import DistributedSampler

from datamodules.cifar import CIFAR10DataModule
from datamodules.device_batches import DeviceBatches, resident_device
from datamodules.order import EpochOrder, ResumableLoader
from datamodules.ptb import PennTreebankDataModule
from datamodules.super_resolution import SuperResolutionDataModule
from lit_divnorm.callbacks import ResumeCheckpoint
from lit_divnorm.tasks.classification import ClassificationTask
from lit_divnorm.tasks.language_model import LanguageModelTask
from lit_divnorm.tasks.super_resolution import SuperResolutionTask
from tests.cifar.fixtures import write_cifar10
from tests.ptb.conftest import random_lines, write_corpus
from tests.sr.conftest import write_rgb

pytestmark = [
    pytest.mark.filterwarnings("ignore:CIFAR-10. training on:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def _ranked(datamodule, rank: int, world_size: int):
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    return datamodule


def _batches(loader, epoch: int, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(tuple(batch))
        if limit is not None and len(out) == limit:
            break
    return out


def _assert_same_batches(device, reference) -> None:
    assert len(device) == len(reference) > 0
    for k, (got, expected) in enumerate(zip(device, reference, strict=True)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert torch.equal(a, b), f"batch {k} differs"


def _as_lightning_shards(loader, trainer):
    """What the trainer makes of an evaluation ``DataLoader`` under DDP: the same loader with
    a ``DistributedSampler`` (no shuffle) of this rank (Lightning's own functions)."""
    if trainer is None or trainer.world_size == 1 or isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = _get_distributed_sampler(
        loader, shuffle=False, overfit_batches=0, mode=RunningStage.VALIDATING,
        num_replicas=trainer.world_size, rank=trainer.global_rank,
    )  # fmt: skip
    return _update_dataloader(loader, sampler, mode=RunningStage.VALIDATING)


def _loaders(make, split: str):
    reference, device = make(False), make(True)
    reference.setup(None)
    device.setup(None)
    loaders = getattr(reference, f"{split}_dataloader")(), getattr(device, f"{split}_dataloader")()
    loaders = _as_lightning_shards(loaders[0], reference.trainer), loaders[1]
    assert isinstance(loaders[0], torch.utils.data.DataLoader)
    assert isinstance(loaders[1], DeviceBatches)
    assert len(loaders[0]) == len(loaders[1])
    return loaders


# --------------------------------------------------------------------------- CIFAR
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), batches=(1,), n=37)


@pytest.mark.parametrize("preprocessing", ["paper", "resnet"])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_cifar_device_batches_are_the_dataloader_batches(
    cifar_root, preprocessing, rank, world_size, drop_last
):
    def make(resident: bool) -> CIFAR10DataModule:
        datamodule = CIFAR10DataModule(
            cifar_root, batch_size=8, preprocessing=preprocessing, seed=4, val_size=9,
            drop_last=drop_last, device_resident=resident,
        )  # fmt: skip
        return _ranked(datamodule, rank, world_size)

    for split in ("train", "val", "test"):
        reference, device = _loaders(make, split)
        for epoch in (0, 3):
            _assert_same_batches(_batches(device, epoch), _batches(reference, epoch))
        if split == "train":  # 28 images, 14 per rank of two
            per_rank = 28 // world_size
            assert len(device) == (per_rank // 8 if drop_last else -(-per_rank // 8))


def test_cifar_device_batches_match_dataloader_workers(cifar_root):
    """Against the loader with two worker processes (what the configs' CPU runs use)."""

    def make(resident: bool) -> CIFAR10DataModule:
        workers = 0 if resident else 2
        return CIFAR10DataModule(
            cifar_root, batch_size=10, preprocessing="resnet", num_workers=workers,
            device_resident=resident,
        )  # fmt: skip

    reference, device = _loaders(make, "train")
    _assert_same_batches(_batches(device, 1), _batches(reference, 1))


@pytest.mark.parametrize("resume_from", ["device", "dataloader"])
def test_cifar_device_path_resumes_mid_epoch(cifar_root, resume_from):
    """A position saved after two batches (by either path: checkpoints are interchangeable)
    continues the device path with the rest of that epoch, then the next epoch in full."""

    def make(resident: bool):
        datamodule = CIFAR10DataModule(
            cifar_root, batch_size=5, preprocessing="resnet", seed=2, device_resident=resident
        )
        datamodule.setup("fit")
        return datamodule.train_dataloader()

    whole = make(True)
    expected = _batches(whole, 2)
    interrupted = make(resume_from == "device")
    taken = _batches(interrupted, 2, limit=2)
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["position"] == 10
    resumed = make(True)
    resumed.load_state_dict(state)
    _assert_same_batches(taken + _batches(resumed, 2), expected)
    _assert_same_batches(_batches(resumed, 3), _batches(make(False), 3))


def test_device_resident_default_follows_the_training_device():
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 1)))
    assert resident_device(None, cpu) is None
    assert resident_device(None, gpu) == torch.device("cuda", 1)
    assert resident_device(None, None) is None  # no trainer: the CPU
    assert resident_device(True, cpu) == torch.device("cpu")
    assert resident_device(False, gpu) is None
    with pytest.raises(TypeError, match="device_resident must be True, False or None, got 'yes'"):
        CIFAR10DataModule(device_resident="yes")
    with pytest.raises(TypeError, match="device_resident"):
        PennTreebankDataModule(device_resident=1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 or None, got 0"):
        DeviceBatches(lambda epoch, index: index, EpochOrder(3), batch_size=0)


# --------------------------------------------------------------------------- PTB
@pytest.fixture(scope="module")
def ptb_root(tmp_path_factory) -> Path:
    words = [f"w{i}" for i in range(19)] + ["<unk>"]
    lines = {split: random_lines(seed, 40, words, (3, 9)) for seed, split in enumerate(
        ("train", "valid", "test"))}  # fmt: skip
    return write_corpus(tmp_path_factory.mktemp("ptb"), lines)


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_ptb_device_windows_are_the_dataloader_windows(ptb_root, rank, world_size):
    def make(resident: bool) -> PennTreebankDataModule:
        datamodule = PennTreebankDataModule(
            str(ptb_root), batch_size=3, bptt=7, test_batch_size=2, device_resident=resident
        )
        return _ranked(datamodule, rank, world_size)

    for split in ("train", "val", "test"):
        reference, device = _loaders(make, split)
        _assert_same_batches(_batches(device, 0), _batches(reference, 0))
        _assert_same_batches(_batches(device, 1), _batches(reference, 1))


def test_ptb_device_path_resumes_at_the_next_window(ptb_root):
    def make(resident: bool):
        datamodule = PennTreebankDataModule(str(ptb_root), batch_size=2, bptt=5)
        datamodule.device_resident = resident
        datamodule.setup("fit")
        return datamodule.train_dataloader()

    expected = _batches(make(False), 0)
    interrupted = make(True)
    taken = _batches(interrupted, 0, limit=3)
    resumed = make(True)
    resumed.load_state_dict(interrupted.state_dict())
    _assert_same_batches(taken + _batches(resumed, 0), expected)


# --------------------------------------------------------------------------- SR
@pytest.fixture(scope="module")
def sr_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sr")
    for folder, sizes in (
        ("train", [(30, 34), (27, 40), (25, 25)]),
        ("eval", [(33, 36), (30, 41)]),
    ):
        (root / folder).mkdir()
        for k, (height, width) in enumerate(sizes):
            write_rgb(root / folder / f"{k}.png", height, width, seed=len(folder) + k)
    return root


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_sr_device_patches_are_the_dataloader_patches(sr_root, rank, world_size):
    def make(resident: bool) -> SuperResolutionDataModule:
        datamodule = SuperResolutionDataModule(
            data_dir=str(sr_root), train_dir="train", val_dir="eval", test_dir="train",
            scale=3, patch_size=11, patches_per_image=7, batch_size=4, seed=3,
            device_resident=resident,
        )  # fmt: skip
        return _ranked(datamodule, rank, world_size)

    for split in ("train", "val", "test"):
        reference, device = _loaders(make, split)
        for epoch in (0, 2):
            _assert_same_batches(_batches(device, epoch), _batches(reference, epoch))


def test_sr_device_path_resumes_mid_epoch(sr_root):
    def make(resident: bool):
        datamodule = SuperResolutionDataModule(
            data_dir=str(sr_root), train_dir="train", val_dir="eval", test_dir="train",
            scale=3, patch_size=11, patches_per_image=7, batch_size=4, seed=3,
            device_resident=resident,
        )  # fmt: skip
        datamodule.setup("fit")
        return datamodule.train_dataloader()

    expected = _batches(make(False), 1)
    interrupted = make(True)
    taken = _batches(interrupted, 1, limit=2)
    resumed = make(True)
    resumed.load_state_dict(interrupted.state_dict())
    _assert_same_batches(taken + _batches(resumed, 1), expected)


# --------------------------------------------------------------------------- Lightning
class RecordBatches(Callback):
    """Every training batch as ``training_step`` receives it, and its step."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[torch.Tensor, ...]] = {}
        self.received: list[tuple[torch.Tensor, ...]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[trainer.global_step + 1] = tuple(t.clone() for t in batch)
        self.received.append(tuple(batch))


class Drawn:
    """Wraps a DeviceBatches' draw to keep what it hands out."""

    def __init__(self, draw) -> None:
        self.draw = draw
        self.batches: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, epoch, indices):
        batch = self.draw(epoch, indices)
        self.batches.append(batch)
        return batch


def _fit(root: Path, resident: bool, max_steps: int, folder: Path, ckpt_path=None):
    torch.manual_seed(0)
    datamodule = CIFAR10DataModule(
        root, batch_size=8, preprocessing="resnet", seed=5, device_resident=resident
    )
    task = ClassificationTask("small_cnn", norm="dn*")
    recorder = RecordBatches()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[recorder, ResumeCheckpoint(dirpath=str(folder), every_n_train_steps=3)],
    )  # fmt: skip
    drawn = None
    if resident:
        original = datamodule.train_dataloader

        def train_dataloader():
            nonlocal drawn
            loader = original()
            drawn = loader.draw = Drawn(loader.draw)
            return loader

        datamodule.train_dataloader = train_dataloader
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, task, recorder, drawn


def test_lightning_fits_and_resumes_on_device_batches(cifar_root, tmp_path):
    """37 images, batch 8: 5 batches an epoch. 12 steps cross two epoch ends; the resumed run
    starts from the checkpoint of step 6 (inside epoch 1) and must draw steps 7-12 as the
    uninterrupted device run does, which draws what the DataLoader run draws."""
    _, _, loader_run, _ = _fit(cifar_root, False, 12, tmp_path / "loader")
    _, whole_task, whole, drawn = _fit(cifar_root, True, 12, tmp_path / "whole")
    assert sorted(whole.batches) == list(range(1, 13))
    for step, batch in whole.batches.items():
        _assert_same_batches([batch], [loader_run.batches[step]])
    # Lightning handed training_step the drawn tensors themselves: nothing moved or copied
    assert len(drawn.batches) == 12
    for received, handed in zip(whole.received, drawn.batches, strict=True):
        assert all(a is b for a, b in zip(received, handed, strict=True))

    _fit(cifar_root, True, 6, tmp_path / "part")
    checkpoint = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    [loader_state] = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["epoch"] == 1 and loader_state["position"] == 8
    _, resumed_task, resumed, _ = _fit(
        cifar_root, True, 12, tmp_path / "resumed", ckpt_path=tmp_path / "part" / "last.ckpt"
    )
    assert sorted(resumed.batches) == list(range(7, 13))
    for step in range(7, 13):
        _assert_same_batches([resumed.batches[step]], [whole.batches[step]])
    for name, value in whole_task.state_dict().items():
        torch.testing.assert_close(resumed_task.state_dict()[name], value, msg=name)


def test_resumable_loader_state_fits_device_batches(cifar_root):
    """The loader path's class and the device path's share one state format."""
    datamodule = CIFAR10DataModule(cifar_root, batch_size=4)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    datamodule.device_resident = True
    assert datamodule.train_dataloader().state_dict().keys() == loader.state_dict().keys()


class CountValidation(Callback):
    """The validation batches of every validation pass (sanity check included)."""

    def __init__(self) -> None:
        self.passes: list[tuple[bool, list[tuple[torch.Tensor, ...]]]] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.passes.append((trainer.sanity_checking, []))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        self.passes[-1][1].append(tuple(t.clone() for t in batch))


@pytest.mark.parametrize("resident", [False, True])
def test_every_validation_pass_reads_the_whole_split(ptb_root, resident):
    """After the sanity check's two windows, and twice within an epoch (val_check_interval
    0.5), each validation reads every window from the first: the evaluation order does not
    resume (the training order does), on both paths."""
    datamodule = PennTreebankDataModule(
        str(ptb_root), batch_size=2, bptt=6, device_resident=resident
    )
    counter = CountValidation()
    trainer = Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2,
        val_check_interval=0.5, callbacks=[counter],
    )  # fmt: skip
    task = LanguageModelTask(vocab_size=21, hidden_sizes=(8,))
    trainer.fit(task, datamodule=datamodule)
    trainer.validate(task, datamodule=datamodule, verbose=False)
    reference = PennTreebankDataModule(str(ptb_root), batch_size=2, bptt=6)
    reference.setup("fit")
    windows = [tuple(w) for w in reference.val_dataloader()]
    sanity, *passes = counter.passes
    assert sanity[0] and len(sanity[1]) == 2
    assert len(passes) == 5  # two per epoch, then validate
    for checking, batches in passes:
        assert not checking
        _assert_same_batches(batches, windows)


def test_sr_fit_validates_and_tests_alike_on_both_paths(sr_root):
    """Whole-image validation and test batches (batch 1, sizes differ) through Lightning."""
    metrics = []
    for resident in (False, True):
        torch.manual_seed(0)
        datamodule = SuperResolutionDataModule(
            data_dir=str(sr_root), train_dir="train", val_dir="eval", test_dir="eval",
            allow_same_val_test=True, scale=3, patch_size=21, patches_per_image=4,
            batch_size=4, seed=3, device_resident=resident,
        )  # fmt: skip
        task = SuperResolutionTask(num_images_to_show=0)
        trainer = Trainer(
            accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(task, datamodule=datamodule)
        fitted = {k: float(v) for k, v in trainer.callback_metrics.items()}
        [tested] = trainer.test(task, datamodule=datamodule, verbose=False)
        metrics.append({**fitted, **tested})
    assert "val/psnr" in metrics[0] and "test/psnr" in metrics[0]
    assert metrics[1] == metrics[0]
