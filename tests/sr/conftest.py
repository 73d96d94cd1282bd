"""Tiny on-disk image folders in the formats the SR datamodule reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_rgb(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (so bicubic is a sensible baseline), saved at ``path``."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, size=3)
    pixels = np.stack(
        [127 + 100 * np.sin(xs / (4 + c) + ys / (5 + c) + phase[c]) for c in range(3)], axis=-1
    )
    pixels = np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


@pytest.fixture
def sr_folders(tmp_path: Path) -> Path:
    """``tmp_path/train`` (RGB PNG, BMP, JPEG), ``tmp_path/eval`` (RGB PNG + gray BMP: the
    validation set) and ``tmp_path/test`` (two RGB PNG)."""
    train = tmp_path / "train"
    evaluation = tmp_path / "eval"
    train.mkdir()
    evaluation.mkdir()
    write_rgb(train / "a.png", 40, 45, 0)
    write_rgb(train / "b.bmp", 50, 37, 1)
    write_rgb(train / "c.jpg", 36, 41, 2)
    write_rgb(evaluation / "rgb.png", 41, 38, 3)
    gray = write_rgb(tmp_path / "unused.png", 36, 45, 4)[..., 0]
    Image.fromarray(gray, "L").save(evaluation / "gray.bmp")
    (tmp_path / "test").mkdir()
    write_rgb(tmp_path / "test" / "t1.png", 33, 35, 5)
    write_rgb(tmp_path / "test" / "t2.png", 30, 44, 6)
    return tmp_path
