"""SuperResolutionTask: loss, L1 flag, PSNR/SSIM against direct numpy, comparison pictures."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from scipy.signal import correlate2d

from datamodules.super_resolution import SuperResolutionDataModule
from lit_divnorm.tasks.super_resolution import (
    SuperResolutionTask,
    psnr_per_image,
    ssim_per_image,
    to_pixels,
)

DN_STAR = {"name": "dn*", "sum_window": 5, "sup_window": 7, "sigma": 1.0, "l1": 0.1}


def _numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


def _numpy_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM: 11x11 Gaussian (sigma 1.5) window, valid positions only."""
    ax = np.arange(11) - 5
    g = np.exp(-(ax**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z):
        return correlate2d(z, window, mode="valid")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim_map.mean())


def _pair(seed: int, shape=(2, 1, 30, 34)):
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=generator, dtype=torch.float64) * 255
    noisy = target + 20 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return noisy.clamp(0, 255), target


def _zipped(prediction, target):
    return zip(prediction, target, strict=True)


def test_psnr_is_per_image_ten_log10_of_peak_over_mse():
    prediction, target = _pair(0)
    expected = [_numpy_psnr(p[0].numpy(), t[0].numpy()) for p, t in _zipped(prediction, target)]
    torch.testing.assert_close(
        psnr_per_image(prediction, target), torch.tensor(expected, dtype=torch.float64)
    )


def test_ssim_is_gaussian_11_sigma_1_5_on_0_255():
    prediction, target = _pair(1)
    expected = [_numpy_ssim(p[0].numpy(), t[0].numpy()) for p, t in _zipped(prediction, target)]
    result = ssim_per_image(prediction, target)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=0)


def test_to_pixels_scales_and_clips():
    values = torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2])
    assert to_pixels(values).tolist() == [0.0, 0.0, 127.5, 255.0, 255.0]


def _independent_dn_star_penalty(model, bicubic) -> torch.Tensor:
    """0.1 * mean|x - local mean| per norm slot: channel mean, 5x5 box over valid positions."""
    inputs = []
    hooks = [n.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for n in model.norms]
    with torch.no_grad():
        model(bicubic)
    for hook in hooks:
        hook.remove()
    total = torch.zeros(())
    for x in inputs:
        mean = F.avg_pool2d(x.mean(1, keepdim=True), 5, 1, 2, count_include_pad=False)
        total = total + 0.1 * (x - mean).abs().mean()
    return total


@pytest.mark.parametrize("add_l1", [True, False])
def test_training_loss_is_border_cropped_mse_plus_l1_when_asked(add_l1):
    task = SuperResolutionTask(norm=DN_STAR, add_l1_to_loss=add_l1)
    generator = torch.Generator().manual_seed(3)
    bicubic = torch.rand(4, 1, 33, 33, generator=generator)
    hr = torch.rand(4, 1, 33, 33, generator=generator)
    with torch.no_grad():
        mse = F.mse_loss(task.model(bicubic), hr[..., 8:-8, 8:-8])
    penalty = _independent_dn_star_penalty(task.model, bicubic)
    assert penalty > 0
    task.model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = task.training_step((bicubic, hr), 0)
    expected = mse + penalty if add_l1 else mse
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-8)


def test_default_optimizer_is_the_released_sgd():
    optimizer = SuperResolutionTask().configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["momentum"] == 0.9


def test_validation_logs_model_and_bicubic_scores_and_saves_pictures(sr_folders, tmp_path):
    data = SuperResolutionDataModule(
        data_dir=str(sr_folders),
        train_dir="train",
        val_dir="eval",
        test_dir="test",
        scale=3,
        patches_per_image=2,
        batch_size=2,
    )
    task = SuperResolutionTask(norm=None, num_images_to_show=1)
    trainer = Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(task, datamodule=data)
    metrics = trainer.callback_metrics
    bicubic_psnr, bicubic_ssim, model_psnr = [], [], []
    task.eval()
    for bicubic, hr in data.val_dataloader():
        crop = (0, 0, slice(8, -8), slice(8, -8))
        b = np.clip(bicubic[crop].double().numpy() * 255, 0, 255)
        t = hr[crop].double().numpy() * 255
        with torch.no_grad():
            out = np.clip(task.model(bicubic)[0, 0].double().numpy() * 255, 0, 255)
        bicubic_psnr.append(_numpy_psnr(b, t))
        bicubic_ssim.append(_numpy_ssim(b, t))
        model_psnr.append(_numpy_psnr(out, t))
    assert metrics["val/psnr_bicubic"].item() == pytest.approx(np.mean(bicubic_psnr), abs=1e-3)
    assert metrics["val/ssim_bicubic"].item() == pytest.approx(np.mean(bicubic_ssim), abs=1e-4)
    assert metrics["val/psnr"].item() == pytest.approx(np.mean(model_psnr), abs=1e-3)
    assert "val/ssim" in metrics
    assert "train/l1" not in metrics  # the baseline has no L1 penalty to log

    pictures = list((tmp_path / "logs").rglob("val_comparison_0_step*.png"))
    assert len(pictures) == 1
    picture = np.asarray(Image.open(pictures[0]))
    bicubic, hr = next(iter(data.val_dataloader()))
    crop = (0, 0, slice(8, -8), slice(8, -8))
    height, width = hr[crop].shape
    assert picture.shape == (height, 3 * width + 8)
    left = np.round(np.clip(bicubic[crop].numpy() * 255, 0, 255))
    right = np.round(hr[crop].numpy() * 255)
    np.testing.assert_array_equal(picture[:, :width], left)
    np.testing.assert_array_equal(picture[:, -width:], right)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_images_to_show"):
        SuperResolutionTask(num_images_to_show=-1)
    with pytest.raises(ValueError, match="unknown norm"):
        SuperResolutionTask(norm="no-such-norm")


def test_reference_border_mode_reaches_the_norm_layers():
    task = SuperResolutionTask(norm={**DN_STAR, "border": "reference"})
    assert all(norm.border == "reference" for norm in task.model.norms)


def test_subclass_model_with_uneven_crop_is_refused():
    class Uneven(SuperResolutionTask):
        def build_model(self, norm, init_std):
            return torch.nn.Conv2d(1, 1, (3, 5))

    task = Uneven()
    batch = (torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20))
    with pytest.raises(ValueError, match="not the target"):
        task._shared_step(batch, "val")
