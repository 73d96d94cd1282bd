"""Single-image super-resolution with SRCNN, measured as the field measures it.

Scale convention: images enter and leave the network in ``[0, 1]`` (Y / 255, as SRCNN's
and the authors' Matlab/TensorFlow code); the loss is the MSE on that scale. Metrics are
computed on ``255 * output`` clipped to ``[0, 255]`` (not rounded, like the authors' release)
against the integer-valued 0..255 target, both cropped by the model's ``border`` (the pixels
its VALID convolutions remove; 8 for 9-5-5)::

    PSNR = 10 log10(255^2 / mean((255 * y_hat - 255 * y)^2))       per image, then averaged
    SSIM = torchmetrics' SSIM map, Gaussian 11x11, sigma 1.5, data_range 255, averaged over
           the valid window positions (as Wang et al.'s ssim_index)   per image, averaged

The bicubic input is measured the same way on the same crop (``*/psnr_bicubic``,
``*/ssim_bicubic``), so the model's gain over bicubic reads directly from the logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torch import Tensor, nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from lit_divnorm.models.srcnn import SRCNN
from lit_divnorm.norm.registry import NormSpec
from lit_divnorm.norm.sparsity import clear_sparsity, sparsity_penalty
from lit_divnorm.tasks.base import NormalizedTask, Stage

PIXEL_MAX = 255.0
SSIM_KERNEL_SIZE = 11
SSIM_SIGMA = 1.5


def to_pixels(image: Tensor) -> Tensor:
    """``[0, 1]`` network scale -> ``255 * image`` clipped to ``[0, 255]``."""
    return (image * PIXEL_MAX).clamp(0.0, PIXEL_MAX)


def center_crop(image: Tensor, border: int) -> Tensor:
    """Drop ``border`` pixels on each side of the last two dimensions of ``(..., H, W)``."""
    if border < 0 or 2 * border >= min(image.shape[-2:]):
        raise ValueError(
            f"border must be in [0, min(H, W) / 2), got {border} for shape {tuple(image.shape)}"
        )
    if border == 0:
        return image
    return image[..., border:-border, border:-border]


def psnr_per_image(prediction: Tensor, target: Tensor) -> Tensor:
    """``(N,)`` PSNR in dB of ``(N, C, H, W)`` images on the 0..255 scale."""
    return peak_signal_noise_ratio(
        prediction.double(),
        target.double(),
        data_range=PIXEL_MAX,
        reduction="none",
        dim=(1, 2, 3),
    ).reshape(-1)


def ssim_per_image(prediction: Tensor, target: Tensor) -> Tensor:
    """``(N,)`` SSIM of ``(N, C, H, W)`` images on the 0..255 scale (11x11 Gaussian, 1.5).

    The SSIM map comes from torchmetrics; it is averaged over the positions whose 11x11
    window lies inside the image, like Wang et al.'s ``ssim_index`` ('valid' filtering) used
    by the field. (torchmetrics' own mean also counts the reflect-padded border positions.)
    """
    if min(prediction.shape[-2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} pixels, got "
            f"shape {tuple(prediction.shape)}"
        )
    _, ssim_map = structural_similarity_index_measure(
        prediction.double(),
        target.double(),
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL_SIZE,
        data_range=PIXEL_MAX,
        reduction="none",
        return_full_image=True,
    )
    half = SSIM_KERNEL_SIZE // 2
    return ssim_map[..., half:-half, half:-half].mean(dim=(1, 2, 3))


def _default_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9)


class SuperResolutionTask(NormalizedTask):
    """SRCNN trained with the MSE on the border-cropped HR Y channel.

    Batches are ``(bicubic, hr)`` pairs of ``(N, 1, H, W)`` tensors in ``[0, 1]`` (see
    :mod:`datamodules.super_resolution`).

    Args:
        norm: the normalization of both slots of :class:`SRCNN` (``None``: the baseline).
        init_std: SRCNN weight initialization std.
        add_l1_to_loss: add the norm layers' L1 sparsity penalty to the loss (the paper);
            ``False`` reproduces the authors' SR release, which computes but never adds it
            (it is still logged as ``train/l1``).
        num_images_to_show: evaluation images (the first ones) drawn side by side as
            bicubic | model | ground truth at each validation/test epoch.
        optimizer, lr_scheduler, scheduler_interval, compile: see :class:`NormalizedTask` (default
            SGD lr 1e-4, momentum 0.9, as the released code).
    """

    def __init__(
        self,
        norm: NormSpec = None,
        init_std: float = 1e-3,
        add_l1_to_loss: bool = True,
        num_images_to_show: int = 3,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, scheduler_interval, compile)
        if isinstance(num_images_to_show, bool) or not isinstance(num_images_to_show, int):
            raise TypeError(f"num_images_to_show must be an int, got {num_images_to_show!r}")
        if num_images_to_show < 0:
            raise ValueError(f"num_images_to_show must be >= 0, got {num_images_to_show}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "compile"])
        self.add_l1_to_loss = add_l1_to_loss
        self.num_images_to_show = num_images_to_show
        self.model = self.build_model(norm=norm, init_std=init_std)

    def build_model(self, norm: NormSpec, init_std: float) -> nn.Module:
        """The network; override to try another one (it must expose ``border``)."""
        return SRCNN(norm=norm, init_std=init_std)

    @property
    def border(self) -> int:
        return int(self.model.border)

    def forward(self, bicubic: Tensor) -> Tensor:
        return self.model(bicubic)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.add_l1_to_loss:
            return super().training_step(batch, batch_idx)
        clear_sparsity(self.model)
        loss = self._shared_step(batch, "train")
        self.log_sparsity(sparsity_penalty(self.model))
        self.log_sigmas()
        return loss

    def _shared_step(self, batch: Any, stage: Stage) -> Tensor:
        loss, _ = self._measure(batch, stage)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluation_step(batch, batch_idx, "test")

    def _evaluation_step(self, batch: Any, batch_idx: int, stage: Stage) -> Tensor:
        loss, output = self._measure(batch, stage)
        if batch_idx < self.num_images_to_show and not self.trainer.sanity_checking:
            bicubic, hr = batch
            self.log_comparison(bicubic, output, hr, f"{stage}/comparison_{batch_idx}")
        return loss

    def _measure(self, batch: Any, stage: Stage) -> tuple[Tensor, Tensor]:
        """Loss (and in evaluation PSNR/SSIM of model and bicubic); returns loss, output."""
        bicubic, hr = batch
        output = self.model(bicubic)
        border = (hr.shape[-1] - output.shape[-1]) // 2
        target = center_crop(hr, border)
        if target.shape != output.shape:
            raise ValueError(
                f"model output {tuple(output.shape)} is not the target {tuple(hr.shape)} "
                f"cropped by a border on every side"
            )
        loss = F.mse_loss(output, target)
        size = bicubic.shape[0]
        self.log_loss(stage, loss, size)
        if stage != "train":
            truth = to_pixels(target)
            for name, image in (("", output), ("_bicubic", center_crop(bicubic, border))):
                pixels = to_pixels(image)
                self.log(
                    f"{stage}/psnr{name}",
                    psnr_per_image(pixels, truth).mean(),
                    batch_size=size,
                    sync_dist=True,
                )
                self.log(
                    f"{stage}/ssim{name}",
                    ssim_per_image(pixels, truth).mean(),
                    batch_size=size,
                    sync_dist=True,
                )
        return loss, output

    def log_comparison(self, bicubic: Tensor, output: Tensor, hr: Tensor, tag: str) -> None:
        """Save ``bicubic | model | ground truth`` (first image, cropped alike) via the logger.

        TensorBoard loggers get ``add_image``; otherwise a PNG is written to
        ``<log_dir>/images/<tag>_step<global step>.png``.
        """
        if not self.trainer.is_global_zero:
            return
        border = (hr.shape[-1] - output.shape[-1]) // 2
        panels = [to_pixels(center_crop(bicubic[0, 0], border)), to_pixels(output[0, 0])]
        panels.append(to_pixels(center_crop(hr[0, 0], border)))
        gap = torch.full((panels[0].shape[0], 4), PIXEL_MAX, device=output.device)
        picture = torch.cat([panels[0], gap, panels[1], gap, panels[2]], dim=1)
        picture = picture.round().to(torch.uint8).cpu()
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, picture, self.global_step, dataformats="HW")
            return
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        path = Path(log_dir) / "images" / f"{tag.replace('/', '_')}_step{self.global_step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(picture.numpy())).save(path)
