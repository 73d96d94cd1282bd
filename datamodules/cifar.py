"""CIFAR-10 and CIFAR-100 as LightningDataModules (one shared base, two small subclasses).

    data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch}     CIFAR10DataModule
    data_dir/cifar-100-python/{train, test}                         CIFAR100DataModule

``prepare_data`` downloads the official archive when the files are missing (and ``download``
is true); when it cannot, it raises ``FileNotFoundError`` naming the files to place and the
folder. ``setup`` reads the pickles with the project's own safe reader
(:mod:`datamodules.cifar_files`): nothing in a data file is executed, and files are validated
by shape, dtype and label range rather than by MD5, so a re-packed local copy works.

Preprocessing (batches are ``(N, 3, 32, 32)`` float32 images and ``(N,)`` int64 labels):

* ``"paper"``: ``x - mean_image`` on the 0-255 scale, no augmentation (Ren et al., 2017).
  The mean image is the per-pixel mean over the training images actually trained on (the
  authors' code averaged over train and test together; we keep the test set out of it).
* ``"resnet"``: ``x / 255``; training images also get a random crop of the image zero-padded
  by 4 pixels and a random horizontal flip.

The training order and the crops and flips are functions of ``(seed, epoch, rank, index)``
(:mod:`datamodules.order`), not of a global random stream: a run resumed from a checkpoint
taken inside an epoch sees the rest of that epoch exactly as the run that was not stopped,
with any number of workers. Under DDP each rank reads its own shard of every epoch's order.

``device_resident`` (on by default when training on a GPU) keeps each split on the training
device as one uint8 tensor and draws the batches there (:class:`~datamodules.device_batches.
DeviceBatches`): the same order, mean image, crops and flips through the same
:meth:`CifarDataset.batch`, so both paths give the same batches and resume alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.cifar_files import CifarArchive, CifarArrays, download_archive, read_batches
from datamodules.device_batches import DeviceBatches, check_device_resident, resident_device
from datamodules.order import (
    EpochOrder,
    ResumableLoader,
    SampleKey,
    default_seed,
    rank_and_world_size,
    sample_randint,
)

Preprocessing = Literal["paper", "resnet"]
PREPROCESSINGS: tuple[str, ...] = ("paper", "resnet")
Transform = Callable[[Tensor], Tensor]


class SubtractMeanImage:
    """``x - mean`` on the 0-255 scale; ``x`` uint8 ``(..., 3, 32, 32)``, ``mean`` float
    ``(3, 32, 32)`` (one image or a batch)."""

    def __init__(self, mean: Tensor) -> None:
        self.mean = mean

    def __call__(self, image: Tensor) -> Tensor:
        return image.float() - self.mean

    def to(self, device: torch.device) -> SubtractMeanImage:
        """The same transform with its mean image on ``device``."""
        return SubtractMeanImage(self.mean.to(device))


class ScaleToUnit:
    """``x / 255``: uint8 ``(..., C, H, W)`` to float in ``[0, 1]``."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.float() / 255.0

    def to(self, device: torch.device) -> ScaleToUnit:
        return self


class RandomCropFlip:
    """``H x W`` crop of the image zero-padded by ``padding``, then a horizontal flip (p = 1/2).

    The crop offsets ``top, left`` (uniform in ``0 .. 2 * padding``) and the flip of sample
    ``index`` in ``epoch`` are :func:`~datamodules.order.sample_randint` draws of ``(seed,
    epoch, index)`` (streams 0, 1, 2): the same on every run, worker and device.
    """

    def __init__(self, padding: int = 4, seed: int = 0) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {padding!r}")
        self.padding = padding
        self.seed = seed

    def draw(self, epoch: int, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(tops, lefts, flips)`` of the samples ``indices`` ``(B,)``, each ``(B,)`` int64."""
        offsets = 2 * self.padding + 1
        tops = sample_randint(offsets, self.seed, epoch, indices, stream=0)
        lefts = sample_randint(offsets, self.seed, epoch, indices, stream=1)
        flips = sample_randint(2, self.seed, epoch, indices, stream=2)
        return tops, lefts, flips

    def apply(self, images: Tensor, tops: Tensor, lefts: Tensor, flips: Tensor) -> Tensor:
        """Crop ``b`` of ``images`` ``(B, C, H, W)`` padded, at ``(tops[b], lefts[b])``,
        flipped where ``flips[b]`` is 1: ``(B, C, H, W)`` on the images' device.

        ``out[b, c, i, j] = padded[b, c, tops[b] + i, lefts[b] + j']`` with ``j' = j``, or
        ``W - 1 - j`` for a flipped sample; one gather for the whole batch.
        """
        batch, channels, height, width = images.shape
        device, pad = images.device, self.padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        rows = tops.to(device)[:, None] + torch.arange(height, device=device)
        columns = torch.arange(width, device=device)
        columns = torch.where(flips.to(device)[:, None].bool(), columns.flip(0), columns)
        columns = lefts.to(device)[:, None] + columns
        return padded[
            torch.arange(batch, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]


def _split_key(key: int | SampleKey) -> SampleKey:
    """``(epoch, index)`` of a sampler key; a plain index means epoch 0."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return 0, int(key)


class CifarDataset(Dataset):
    """Images uint8 ``(N, 3, 32, 32)`` and labels ``(N,)``, on any one device.

    :meth:`batch` ``(epoch, indices)`` is ``(transform(images[indices]), labels[indices])``,
    cropped and flipped by ``augment`` (as drawn for each sample in ``epoch``) when one is
    given: the one implementation of a batch, which the ``DataLoader`` path (item ``key``:
    an index ``i``, or ``(epoch, i)`` from ``EpochOrder(with_epoch=True)``; ``__getitems__``
    draws a worker's keys of one epoch at once) and the device-resident path (:meth:`to`,
    then :class:`~datamodules.device_batches.DeviceBatches`) both call.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Transform,
        augment: RandomCropFlip | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images and labels must have the same length, got {images.shape[0]} "
                f"and {labels.shape[0]}"
            )
        self.images = images
        self.labels = labels
        self.transform = transform
        self.augment = augment

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device) -> CifarDataset:
        """The same split with its images, labels and mean image on ``device``."""
        transform = self.transform.to(device) if hasattr(self.transform, "to") else self.transform
        return CifarDataset(self.images.to(device), self.labels.to(device), transform, self.augment)

    def batch(self, epoch: int, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(images (B, 3, 32, 32) float32, labels (B,))`` of the samples ``indices`` ``(B,)``
        (int64, on the images' device) as drawn in ``epoch``."""
        images = self.transform(self.images[indices])
        if self.augment is not None:
            images = self.augment.apply(images, *self.augment.draw(epoch, indices))
        return images, self.labels[indices]

    def __getitem__(self, key: int | SampleKey) -> tuple[Tensor, Tensor]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[int | SampleKey]) -> list[tuple[Tensor, Tensor]]:
        pairs = [_split_key(key) for key in keys]
        items: list[tuple[Tensor, Tensor] | None] = [None] * len(pairs)
        for epoch in sorted({epoch for epoch, _ in pairs}):
            chosen = [k for k, (e, _) in enumerate(pairs) if e == epoch]
            indices = torch.tensor([pairs[k][1] for k in chosen], dtype=torch.int64)
            images, labels = self.batch(epoch, indices)
            for k, image, label in zip(chosen, images, labels):
                items[k] = (image, label)
        return items


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class CifarDataModule(LightningDataModule):
    """Shared base of the CIFAR datamodules; subclasses say where their files are.

    Args:
        data_dir: folder that holds (or will hold) the dataset's official folder.
        batch_size: images per batch (the paper: 100).
        num_workers, pin_memory: passed to every ``DataLoader``.
        drop_last: drop the last incomplete training batch.
        val_size: training images held out for validation (e.g. 5000 for a 45k/5k split);
            0 (default, as in the paper) means no validation loop.
        split_seed: seed of the random train/validation split.
        seed: seed of the training order and of the crops and flips (``None``: the run's
            ``seed_everything``, as Lightning seeds its own distributed sampler; 0 without).
        preprocessing: ``"paper"`` (mean image subtracted, 0-255) or ``"resnet"`` (/255,
            pad-4 random crop and flip for training).
        download: let ``prepare_data`` fetch the official archive when files are missing.
        device_resident: keep every split on the training device as one uint8 tensor and
            draw, preprocess and shard the batches there (:class:`~datamodules.
            device_batches.DeviceBatches`: no worker processes, no copy per batch; the same
            batches as the ``DataLoader`` path); ``None`` (default): on when training on a
            GPU, off on the CPU. ``num_workers`` and ``pin_memory`` then do not apply.
    """

    archive: ClassVar[CifarArchive]
    num_classes: int

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 100,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        val_size: int = 0,
        split_seed: int = 0,
        preprocessing: Preprocessing = "paper",
        download: bool = True,
        seed: int | None = None,
        device_resident: bool | None = None,
    ) -> None:
        super().__init__()
        if preprocessing not in PREPROCESSINGS:
            raise ValueError(
                f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}"
            )
        self.data_dir = Path(data_dir)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.val_size = _check_int("val_size", val_size, 0)
        self.split_seed = _check_int("split_seed", split_seed, 0)
        self.seed = None if seed is None else _check_int("seed", seed, 0)
        self.preprocessing = preprocessing
        self.download = bool(download)
        self.device_resident = check_device_resident(device_resident)
        self.train_set: CifarDataset | None = None
        self.val_set: CifarDataset | None = None
        self.test_set: CifarDataset | None = None
        self.mean_image: Tensor | None = None
        self._resident: dict[tuple[str, torch.device], CifarDataset] = {}

    # -- what subclasses define ------------------------------------------------------------
    @property
    def folder(self) -> Path:
        """The dataset's official folder inside ``data_dir``."""
        return self.data_dir / self.archive.folder

    def train_files(self) -> list[Path]:
        raise NotImplementedError

    def test_files(self) -> list[Path]:
        raise NotImplementedError

    def expected_files(self) -> list[str]:
        """Names (inside :attr:`folder`) of the files the dataset needs, for error messages."""
        raise NotImplementedError

    def read(self, paths: Sequence[Path]) -> CifarArrays:
        raise NotImplementedError

    # -- Lightning hooks -------------------------------------------------------------------
    def _missing(self) -> bool:
        try:
            return not (self.train_files() and self.test_files())
        except FileNotFoundError:
            return True

    def prepare_data(self) -> None:
        """Download the official archive when the files are missing, or say what to place where."""
        if not self._missing():
            return
        reason = "downloading is switched off (download=False)"
        if self.download:
            try:
                download_archive(self.archive, self.data_dir)
            except RuntimeError as error:
                reason = str(error)
            if not self._missing():
                return
        raise FileNotFoundError(
            f"{type(self).__name__}: the CIFAR files are missing from {self.folder} and "
            f"could not be fetched ({reason}). Put {', '.join(self.expected_files())} there "
            f"(unpack {self.archive.url} into {self.data_dir})."
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self.read(self.train_files())
        test = self.read(self.test_files())
        images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
        val_images = val_labels = None
        if self.val_size:
            if self.val_size >= len(train):
                raise ValueError(
                    f"val_size must be smaller than the {len(train)} training images, "
                    f"got {self.val_size}"
                )
            generator = torch.Generator().manual_seed(self.split_seed)
            order = torch.randperm(len(train), generator=generator)
            val_index, train_index = order[: self.val_size], order[self.val_size :]
            val_images, val_labels = images[val_index], labels[val_index]
            images, labels = images[train_index], labels[train_index]
        train_transform, eval_transform = self._transforms(images)
        augment = RandomCropFlip(4, self.order_seed) if self.preprocessing == "resnet" else None
        self.train_set = CifarDataset(images, labels, train_transform, augment)
        if val_images is not None:
            self.val_set = CifarDataset(val_images, val_labels, eval_transform)
        self.test_set = CifarDataset(
            torch.from_numpy(test.images), torch.from_numpy(test.labels), eval_transform
        )

    @property
    def order_seed(self) -> int:
        """``seed``, or the run's ``seed_everything`` when it is ``None``."""
        return default_seed() if self.seed is None else self.seed

    def _transforms(self, train_images: Tensor) -> tuple[Transform, Transform]:
        if self.preprocessing == "paper":
            self.mean_image = train_images.double().mean(dim=0).float()
            transform = SubtractMeanImage(self.mean_image)
            return transform, transform
        return ScaleToUnit(), ScaleToUnit()

    def _loader(self, split: str, train: bool) -> DataLoader | DeviceBatches:
        """Training: this rank's :class:`EpochOrder` through a :class:`ResumableLoader`, or
        through :class:`DeviceBatches` over the split's copy on the training device;
        evaluation: in order (under DDP each rank reads every ``world_size``-th sample, as
        Lightning's ``DistributedSampler`` does for a ``DataLoader``). Neither draws from the
        global random generators (worker seeds come from a generator of their own), so
        resuming does not shift them."""
        dataset = getattr(self, f"{split}_set")
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before the dataloaders")
        rank, world_size = rank_and_world_size(self.trainer)
        device = resident_device(self.device_resident, self.trainer)
        if device is not None:
            if (split, device) not in self._resident:
                self._resident[split, device] = dataset.to(device)
            resident = self._resident[split, device]
            if train:
                order = EpochOrder(len(dataset), self.order_seed, rank, world_size)
            else:
                order = EpochOrder(len(dataset), 0, rank, world_size, shuffle=False)
            drop_last = self.drop_last and train
            return DeviceBatches(
                resident.batch, order, self.batch_size, drop_last, device, resumable=train
            )
        options = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "generator": torch.Generator().manual_seed(self.order_seed),
        }
        if not train:
            return DataLoader(dataset, shuffle=False, **options)
        order = EpochOrder(
            len(dataset), self.order_seed, rank, world_size, with_epoch=dataset.augment is not None
        )
        return ResumableLoader(dataset, sampler=order, drop_last=self.drop_last, **options)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches | list:
        """The held-out split, or ``[]`` (no validation) when ``val_size`` is 0."""
        if self.val_size == 0:
            return []
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test", train=False)


class CIFAR10DataModule(CifarDataModule):
    """CIFAR-10 from ``data_dir/cifar-10-batches-py`` (10 classes, 32x32 RGB).

    Args:
        train_batches: which ``data_batch_N`` files (N in 1..5) to train on. ``None``
            (default) takes every ``data_batch_N`` present, so a folder with only some of
            the five training batches (e.g. the project's shared ``data_batch_1``) can be
            trained on; a warning says when fewer than five are found.
        **kwargs: see :class:`CifarDataModule`.
    """

    archive = CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
    )
    num_classes = 10

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 100,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        val_size: int = 0,
        split_seed: int = 0,
        preprocessing: Preprocessing = "paper",
        download: bool = True,
        train_batches: list[int] | None = None,
        seed: int | None = None,
        device_resident: bool | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            batch_size,
            num_workers,
            pin_memory,
            drop_last,
            val_size,
            split_seed,
            preprocessing,
            download,
            seed,
            device_resident,
        )
        if train_batches is not None:
            bad = [b for b in train_batches if isinstance(b, bool) or b not in range(1, 6)]
            if not train_batches or bad:
                raise ValueError(
                    f"train_batches must be a non-empty list of ints in 1..5, got {train_batches!r}"
                )
        self.train_batches = train_batches

    def expected_files(self) -> list[str]:
        return [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

    def train_files(self) -> list[Path]:
        if self.train_batches is None:
            found = [self.folder / f"data_batch_{i}" for i in range(1, 6)]
            found = [path for path in found if path.is_file()]
            if not found:
                raise FileNotFoundError(f"no data_batch_1..5 file in {self.folder}")
            if len(found) < 5:
                rank_zero_warn(
                    f"CIFAR-10: training on {len(found)} of the 5 training batches found in "
                    f"{self.folder} ({', '.join(p.name for p in found)})"
                )
            return found
        paths = [self.folder / f"data_batch_{i}" for i in self.train_batches]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 files {missing} are missing from {self.folder}")
        return paths

    def test_files(self) -> list[Path]:
        path = self.folder / "test_batch"
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 file test_batch is missing from {self.folder}")
        return [path]

    def read(self, paths: Sequence[Path]) -> CifarArrays:
        return read_batches(paths, "labels", self.num_classes)


class CIFAR100DataModule(CifarDataModule):
    """CIFAR-100 from ``data_dir/cifar-100-python`` (``train`` and ``test`` files).

    Args:
        label_type: ``"fine"`` (100 classes, the paper's) or ``"coarse"`` (20 superclasses).
        **kwargs: see :class:`CifarDataModule`.
    """

    archive = CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
    )

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 100,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        val_size: int = 0,
        split_seed: int = 0,
        preprocessing: Preprocessing = "paper",
        download: bool = True,
        label_type: Literal["fine", "coarse"] = "fine",
        seed: int | None = None,
        device_resident: bool | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            batch_size,
            num_workers,
            pin_memory,
            drop_last,
            val_size,
            split_seed,
            preprocessing,
            download,
            seed,
            device_resident,
        )
        if label_type not in ("fine", "coarse"):
            raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
        self.label_type = label_type
        self.num_classes = 100 if label_type == "fine" else 20

    def expected_files(self) -> list[str]:
        return ["train", "test"]

    def _file(self, name: str) -> list[Path]:
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-100 file {name} is missing from {self.folder}")
        return [path]

    def train_files(self) -> list[Path]:
        return self._file("train")

    def test_files(self) -> list[Path]:
        return self._file("test")

    def read(self, paths: Sequence[Path]) -> CifarArrays:
        return read_batches(paths, f"{self.label_type}_labels", self.num_classes)
