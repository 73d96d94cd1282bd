"""Single-image super-resolution data: image folders degraded as the field degrades them.

Every image (PNG, BMP or JPEG; RGB or grayscale) becomes a pair of Y-channel images in
``[0, 1]`` (the network's scale; the task multiplies by 255 to measure):

1. Y of Matlab's ``rgb2ycbcr`` (uint8, 16..235) for RGB images; the gray value itself for
   grayscale ones (as SRCNN's and the authors' Matlab code do);
2. the high-resolution target ``hr``: Y cropped to a multiple of ``scale``, divided by 255;
3. the network input ``bicubic``: Matlab ``imresize(imresize(hr, 1/scale), scale)`` (bicubic,
   antialiased when shrinking), not clipped or rounded.

Training samples are random ``patch_size`` x ``patch_size`` crops at the same place of both
(``patches_per_image`` per image, positions drawn once from ``seed``), read in an order that
is a function of ``(seed, epoch, rank)`` (:class:`~datamodules.order.EpochOrder`, whose
position travels in checkpoints: a run resumed inside an epoch continues with the next patch);
evaluation samples are whole images, batch 1. Samples are ``(bicubic, hr)`` pairs of shape
``(1, H, W)``. With ``device_resident`` (on by default when training on a GPU) the images live
on the training device and each batch of patches is cut there with one gather
(:class:`~datamodules.device_batches.DeviceBatches` over the same order): no ``DataLoader``.

Three folders, paths relative to ``data_dir`` unless absolute: ``train_dir`` (patches),
``val_dir`` (validation: what checkpoints are chosen on) and ``test_dir`` (the reported
figure). Validating on the test folder would choose the checkpoint on the test set, so
``val_dir`` and ``test_dir`` naming the same folder is refused unless
``allow_same_val_test=True`` says that this is intended.
Sets known by name (Set5, Set14, BSD100, BSD200, T91) are fetched in ``prepare_data`` when a
URL is given for them in ``download_urls`` and the network allows; otherwise a missing folder
is an error that says which images to put where.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.device_batches import DeviceBatches, check_device_resident, resident_device
from datamodules.matlab_image import imresize, modcrop, rgb_to_y
from datamodules.order import EpochOrder, ResumableLoader, rank_and_world_size

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg")
KNOWN_SETS: dict[str, int] = {"set5": 5, "set14": 14, "bsd100": 100, "bsd200": 200, "t91": 91}
DOWNLOAD_TIMEOUT_S = 30.0


def list_images(folder: str | Path) -> list[Path]:
    """The image files (``.png``, ``.bmp``, ``.jpg``, ``.jpeg``) directly in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_y(path: str | Path) -> Tensor:
    """The ``(1, H, W)`` float64 Y channel (0..255, integer-valued) of an 8-bit image file.

    RGB(A) images go through Matlab's ``rgb2ycbcr`` on uint8 (rounded); grayscale images (and
    palette images whose palette is gray) keep their gray value. Raises ``ValueError`` naming
    the file when it cannot be decoded or is not 8-bit.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            pixels = _to_uint8_array(image)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image file {path}: {error}") from error
    if pixels is None:
        raise ValueError(
            f"image file {path} has PIL mode {mode!r}; only 8-bit grayscale or RGB images "
            "are supported"
        )
    tensor = torch.from_numpy(pixels.copy())
    if tensor.ndim == 2:
        return tensor.to(torch.float64).unsqueeze(0)
    return rgb_to_y(tensor.permute(2, 0, 1))


def _to_uint8_array(image: Image.Image) -> np.ndarray | None:
    """``(H, W)`` gray or ``(H, W, 3)`` RGB uint8 pixels; ``None`` for other modes."""
    mode = image.mode
    if mode == "P":
        palette = np.asarray(image.convert("RGB")).reshape(-1, 3)
        gray = bool((palette == palette[:, :1]).all())
        mode, image = ("L", image.convert("L")) if gray else ("RGB", image.convert("RGB"))
    if mode in ("L", "LA", "1"):
        return np.asarray(image.convert("L"))
    if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB"))
    return None


def degrade(hr_y: Tensor, scale: int) -> tuple[Tensor, Tensor]:
    """``(bicubic, hr)`` in ``[0, 1]`` from a ``(1, H, W)`` 0..255 Y image (see module doc).

    ``hr`` is ``hr_y`` cropped to multiples of ``scale`` and divided by 255; ``bicubic`` is
    Matlab's bicubic down by ``1 / scale`` then up by ``scale``, the same shape. Float32.
    """
    hr = modcrop(hr_y, scale).to(torch.float64) / 255.0
    bicubic = imresize(imresize(hr, 1.0 / scale), float(scale))
    return bicubic.float(), hr.float()


def load_pairs(paths: Sequence[Path], scale: int) -> list[tuple[Tensor, Tensor]]:
    """``degrade(read_y(path), scale)`` of every path; images smaller than ``scale`` fail."""
    pairs = []
    for path in paths:
        y = read_y(path)
        if min(y.shape[-2:]) < scale:
            raise ValueError(
                f"image file {path} is {tuple(y.shape[-2:])} pixels, smaller than scale={scale}"
            )
        pairs.append(degrade(y, scale))
    return pairs


class PatchDataset(Dataset):
    """Random ``patch_size`` x ``patch_size`` crops of ``(bicubic, hr)`` pairs.

    ``patches_per_image`` positions per pair are drawn uniformly once, from ``seed``, so the
    dataset is a fixed, reproducible set of ``len(pairs) * patches_per_image`` patches
    (``positions`` ``(M, 3)``: image, top, left). Pairs smaller than the patch are left out
    (with a warning). Items: ``(1, P, P)`` tensors.

    The images are packed into one buffer ``flat`` ``(2, sum H W)`` (bicubic, hr; image ``k``
    row-major from ``offsets[k]``, ``widths[k]`` wide; ``pairs`` are views of it), so
    :meth:`batch` cuts a whole batch of patches with one gather, on whatever device the
    buffer is (:meth:`to`): the one implementation behind the ``DataLoader`` items and the
    device-resident batches.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Tensor, Tensor]],
        patch_size: int,
        patches_per_image: int,
        seed: int,
        names: Sequence[str] | None = None,
    ) -> None:
        pairs = list(pairs)
        self.patch_size = patch_size
        generator = torch.Generator().manual_seed(seed)
        positions = []
        too_small = []
        for index, (_, hr) in enumerate(pairs):
            height, width = hr.shape[-2:]
            if height < patch_size or width < patch_size:
                too_small.append(names[index] if names else str(index))
                continue
            count = (patches_per_image,)
            tops = torch.randint(0, height - patch_size + 1, count, generator=generator)
            lefts = torch.randint(0, width - patch_size + 1, count, generator=generator)
            positions.append(torch.stack([torch.full_like(tops, index), tops, lefts], dim=1))
        if too_small:
            warnings.warn(
                f"{len(too_small)} training image(s) smaller than patch_size={patch_size} left "
                f"out: {', '.join(too_small[:5])}",
                stacklevel=2,
            )
        if not positions:
            raise ValueError(
                f"no training image is at least patch_size={patch_size} pixels high and wide"
            )
        self.positions = torch.cat(positions)
        self.heights = torch.tensor([hr.shape[-2] for _, hr in pairs], dtype=torch.int64)
        self.widths = torch.tensor([hr.shape[-1] for _, hr in pairs], dtype=torch.int64)
        areas = self.heights * self.widths
        self.offsets = torch.cumsum(areas, 0) - areas
        self.flat = torch.stack(
            [torch.cat([image.reshape(-1) for image in side]) for side in zip(*pairs)]
        )
        self.pairs = self._views()

    def _views(self) -> list[tuple[Tensor, Tensor]]:
        """``(bicubic, hr)`` ``(1, H, W)`` of every image, as views of ``flat``."""
        views = []
        sizes = (self.offsets.tolist(), self.heights.tolist(), self.widths.tolist())
        for offset, height, width in zip(*sizes):
            image = self.flat[:, offset : offset + height * width].view(2, 1, height, width)
            views.append((image[0], image[1]))
        return views

    def to(self, device: torch.device) -> PatchDataset:
        """The same patches with the image buffer and positions on ``device``."""
        moved = copy.copy(self)
        for name in ("flat", "positions", "heights", "widths", "offsets"):
            setattr(moved, name, getattr(self, name).to(device))
        moved.pairs = moved._views()
        return moved

    def __len__(self) -> int:
        return len(self.positions)

    def batch(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """``(bicubic, hr)``, each ``(B, 1, P, P)``, of the patches ``items`` ``(B,)`` (int64).

        Patch ``(k, top, left)`` is ``image_k[top + i, left + j]`` for ``i, j < P``, read
        from ``flat`` at ``offsets[k] + (top + i) * widths[k] + left + j``.
        """
        image, top, left = self.positions[items].unbind(1)
        width = self.widths[image]
        steps = torch.arange(self.patch_size, device=self.flat.device)
        start = self.offsets[image] + top * width + left
        where = (start[:, None, None] + steps[:, None] * width[:, None, None]) + steps
        patches = self.flat[:, where].unsqueeze(2)  # (2, B, 1, P, P)
        return patches[0], patches[1]

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[int]) -> list[tuple[Tensor, Tensor]]:
        if any(not -len(self) <= item < len(self) for item in items):
            raise IndexError(f"patch index out of range [0, {len(self)}): {items}")
        bicubic, hr = self.batch(torch.tensor(items, dtype=torch.int64) % len(self))
        return list(zip(bicubic, hr))


class ImageDataset(Dataset):
    """Whole ``(bicubic, hr)`` image pairs, each ``(1, H, W)`` (sizes may differ)."""

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor]:
        return self.pairs[item]

    def to(self, device: torch.device) -> ImageDataset:
        """The same images on ``device``."""
        return ImageDataset([(bicubic.to(device), hr.to(device)) for bicubic, hr in self.pairs])


class SuperResolutionDataModule(LightningDataModule):
    """Training patches from one image folder, whole-image validation and test on two others.

    Args:
        data_dir: root that relative ``train_dir`` / ``val_dir`` / ``test_dir`` are resolved
            against.
        train_dir: folder of high-resolution training images (default ``"T91"``).
        val_dir: folder of high-resolution validation images, on which checkpoints are
            chosen (default ``"Set5"``, the released code's evaluation set).
        test_dir: folder of high-resolution test images, the reported figure (default
            ``"Set14"``, a test set of the paper; ``"BSD200"`` is the other).
        allow_same_val_test: accept ``val_dir`` and ``test_dir`` naming the same folder
            (model selection on the test set; refused with ``ValueError`` otherwise).
        scale: upscaling factor (2, 3, 4, ...).
        patch_size: side of the square training patches (33 in SRCNN and the paper).
        patches_per_image: random patches drawn per training image.
        batch_size: training batch size (evaluation always uses batch 1: whole images).
        seed: seed of the patch positions and of the training order.
        num_workers: DataLoader workers.
        download_urls: optional ``{set name: URL of a .zip/.tar archive of its images}`` used
            by ``prepare_data`` for a known set whose folder is empty.
        device_resident: keep the images on the training device and cut the patches there
            (no ``DataLoader`` workers); ``None`` (default): on when training on a GPU.
    """

    def __init__(
        self,
        data_dir: str = "data/sr",
        train_dir: str = "T91",
        val_dir: str = "Set5",
        test_dir: str = "Set14",
        allow_same_val_test: bool = False,
        scale: int = 3,
        patch_size: int = 33,
        patches_per_image: int = 100,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        download_urls: Mapping[str, str] | None = None,
        device_resident: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("scale", scale),
            ("patch_size", patch_size),
            ("patches_per_image", patches_per_image),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        if patch_size < scale:
            raise ValueError(f"patch_size must be >= scale={scale}, got {patch_size}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.train_path = self._resolve(train_dir)
        self.val_path = self._resolve(val_dir)
        self.test_path = self._resolve(test_dir)
        if not allow_same_val_test and _same_folder(self.val_path, self.test_path):
            raise ValueError(
                f"val_dir {val_dir!r} and test_dir {test_dir!r} are the same folder "
                f"({self.val_path}): checkpoints chosen on validation would be chosen on the "
                "test set. Validate on another set (e.g. val_dir: Set5, test_dir: Set14), or "
                "set allow_same_val_test: true if this is intended."
            )
        self.allow_same_val_test = bool(allow_same_val_test)
        self.scale = scale
        self.patch_size = patch_size
        self.patches_per_image = patches_per_image
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.download_urls = {k.lower(): v for k, v in (download_urls or {}).items()}
        self.device_resident = check_device_resident(device_resident)
        self._resident: dict[tuple[str, torch.device], PatchDataset | ImageDataset] = {}
        self.train_set: PatchDataset | None = None
        self.val_set: ImageDataset | None = None
        self.test_set: ImageDataset | None = None
        self.val_names: list[str] = []
        self.test_names: list[str] = []

    def _resolve(self, folder: str) -> Path:
        path = Path(folder)
        return path if path.is_absolute() else self.data_dir / path

    def _folders(self) -> tuple[tuple[str, Path], ...]:
        return (
            ("train_dir", self.train_path),
            ("val_dir", self.val_path),
            ("test_dir", self.test_path),
        )

    def prepare_data(self) -> None:
        """Check every folder holds images; fetch a known set when a URL is given for it."""
        for role, folder in self._folders():
            if list_images(folder):
                continue
            set_name = folder.name.lower()
            url = self.download_urls.get(set_name)
            if url is not None:
                _download_images(url, folder, role)
                if list_images(folder):
                    continue
            raise FileNotFoundError(_missing_message(role, folder, url))

    def setup(self, stage: str | None = None) -> None:
        """Read what ``stage`` needs: patches and validation images to fit, the validation
        images to validate, the test images to test or predict (all of them for ``None``)."""
        if stage in (None, "fit") and self.train_set is None:
            paths = self._images("train_dir", self.train_path)
            pairs = load_pairs(paths, self.scale)
            self.train_set = PatchDataset(
                pairs, self.patch_size, self.patches_per_image, self.seed, [p.name for p in paths]
            )
        if stage in (None, "fit", "validate") and self.val_set is None:
            paths = self._images("val_dir", self.val_path)
            self.val_set = ImageDataset(load_pairs(paths, self.scale))
            self.val_names = [p.name for p in paths]
        if stage in (None, "test", "predict") and self.test_set is None:
            paths = self._images("test_dir", self.test_path)
            self.test_set = ImageDataset(load_pairs(paths, self.scale))
            self.test_names = [p.name for p in paths]

    def _images(self, role: str, folder: Path) -> list[Path]:
        paths = list_images(folder)
        if not paths:
            raise FileNotFoundError(_missing_message(role, folder, None))
        expected = KNOWN_SETS.get(folder.name.lower())
        if expected is not None and len(paths) != expected:
            warnings.warn(
                f"{role} folder {folder} holds {len(paths)} images; {folder.name} has {expected}",
                stacklevel=2,
            )
        return paths

    def _on_device(self, split: str, dataset: PatchDataset | ImageDataset) -> tuple:
        """``(device, copy of dataset there)``, or ``(None, dataset)`` for the DataLoader path."""
        device = resident_device(self.device_resident, self.trainer)
        if device is None:
            return None, dataset
        if (split, device) not in self._resident:
            self._resident[split, device] = dataset.to(device)
        return device, self._resident[split, device]

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """This rank's patches in the order of :class:`EpochOrder` (seeded with ``seed``)."""
        if self.train_set is None:
            self.setup("fit")
        rank, world_size = rank_and_world_size(self.trainer)
        order = EpochOrder(len(self.train_set), self.seed, rank, world_size)
        drop_last = len(self.train_set) >= self.batch_size
        device, patches = self._on_device("train", self.train_set)
        if device is not None:

            def draw(epoch: int, items: Tensor) -> tuple[Tensor, Tensor]:
                return patches.batch(items)

            return DeviceBatches(draw, order, self.batch_size, drop_last, device)
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=order,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_dataloader(self, split: str, images: ImageDataset) -> DataLoader | DeviceBatches:
        device, resident = self._on_device(split, images)
        if device is not None:  # in order; under DDP every world_size-th image, as Lightning's
            rank, world_size = rank_and_world_size(self.trainer)  # DistributedSampler
            order = EpochOrder(len(images), 0, rank, world_size, shuffle=False)

            def draw(epoch: int, item: int) -> tuple[Tensor, Tensor]:
                bicubic, hr = resident[item]
                return bicubic[None], hr[None]  # (1, 1, H, W), as a DataLoader of batch 1

            return DeviceBatches(draw, order, None, device=device, resumable=False)
        return DataLoader(
            images,
            batch_size=1,
            shuffle=False,
            generator=torch.Generator().manual_seed(self.seed),  # no global random draw
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        """The ``val_dir`` images, whole, batch 1."""
        if self.val_set is None:
            self.setup("validate")
        return self._eval_dataloader("val", self.val_set)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        """The ``test_dir`` images, whole, batch 1."""
        if self.test_set is None:
            self.setup("test")
        return self._eval_dataloader("test", self.test_set)


def _same_folder(first: Path, second: Path) -> bool:
    """Whether two paths name one folder (the same file when both exist, else equal paths)."""
    if first.exists() and second.exists():
        return first.samefile(second)
    return first.resolve() == second.resolve()


def _missing_message(role: str, folder: Path, url: str | None) -> str:
    known = KNOWN_SETS.get(folder.name.lower())
    what = (
        f"the {known} high-resolution images of {folder.name}"
        if known is not None
        else "high-resolution images"
    )
    tried = f" (download from {url} failed or held no images)" if url else ""
    return (
        f"{role}: no images (.png, .bmp, .jpg, .jpeg) in {folder}{tried}; put {what} "
        f"directly in that folder"
    )


def _download_images(url: str, folder: Path, role: str) -> None:
    """Fetch an archive from ``url`` and put the image files it holds in ``folder``."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / Path(urllib.parse.urlparse(url).path).name
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                archive.write_bytes(response.read())
            extracted = Path(tmp) / "extracted"
            shutil.unpack_archive(archive, extracted)
        except (OSError, ValueError, shutil.ReadError) as error:
            raise FileNotFoundError(
                f"{_missing_message(role, folder, url)}; the download failed: {error}"
            ) from error
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(extracted.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                shutil.move(str(path), folder / path.name)
