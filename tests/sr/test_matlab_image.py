"""Matlab-compatible rgb2ycbcr and bicubic imresize against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.matlab_image import cubic_kernel, imresize, modcrop, resize_weights, rgb_to_y


def _cubic(x: float) -> float:
    """Matlab's cubic kernel written out from its definition (a = -0.5)."""
    x = abs(x)
    if x <= 1:
        return 1.5 * x**3 - 2.5 * x**2 + 1
    if x <= 2:
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
    return 0.0


def _mirror_1based(index: int, length: int) -> int:
    """Reflect a 1-based index into 1..length by repeated reflection (0 -> 1, n+1 -> n)."""
    while index < 1 or index > length:
        index = 1 - index if index < 1 else 2 * length + 1 - index
    return index


def _resize_line(values: list[float], scale: float) -> list[float]:
    """Matlab's imresize along one line: a direct loop over its formula."""
    n = len(values)
    width = 4.0 / scale if scale < 1 else 4.0
    out = []
    for i in range(1, math.ceil(n * scale) + 1):
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        total = weighted = 0.0
        for tap in range(math.ceil(width) + 2):
            j = left + tap
            d = u - j
            w = scale * _cubic(scale * d) if scale < 1 else _cubic(d)
            weighted += w * values[_mirror_1based(j, n) - 1]
            total += w
        out.append(weighted / total)
    return out


def _reference_imresize(image: list[list[float]], scale: float) -> list[list[float]]:
    columns = [_resize_line([row[c] for row in image], scale) for c in range(len(image[0]))]
    rows = [[columns[c][r] for c in range(len(columns))] for r in range(len(columns[0]))]
    return [_resize_line(row, scale) for row in rows]


def test_cubic_kernel_matches_definition():
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    expected = torch.tensor([_cubic(float(v)) for v in x], dtype=torch.float64)
    torch.testing.assert_close(cubic_kernel(x), expected, rtol=0, atol=1e-15)


def test_upscale_x2_interior_weights_are_the_hand_computed_kernel():
    # output 10 (1-based) sits at u = 10/2 + 1/4 = 5.25; inputs 4..7 at distances
    # 1.25, 0.25, -0.75, -1.75 -> k = -0.0703125, 0.8671875, 0.2265625, -0.0234375
    matrix = resize_weights(10, 20, 2.0)
    row = matrix[9]
    expected = torch.zeros(10, dtype=torch.float64)
    expected[3:7] = torch.tensor([-0.0703125, 0.8671875, 0.2265625, -0.0234375])
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-15)


def test_shrink_by_2_interior_weights_are_the_stretched_hand_computed_kernel():
    # antialiased: 0.5 * k(0.5 d) at d = +-0.5, +-1.5, +-2.5, +-3.5
    matrix = resize_weights(20, 10, 0.5)
    row = matrix[4]  # output 5: u = 9.5, taps at inputs 6..13 (1-based), 5..12 (0-based)
    half = [0.43359375, 0.11328125, -0.03515625, -0.01171875]
    expected = torch.zeros(20, dtype=torch.float64)
    expected[5:13] = torch.tensor(half[::-1] + half)
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("scale", [1 / 3, 1 / 2, 1 / 4, 0.6, 2.0, 3.0, 4.0])
def test_imresize_matches_direct_loop(scale):
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(13, 11, generator=generator, dtype=torch.float64) * 255
    expected = torch.tensor(_reference_imresize(image.tolist(), scale), dtype=torch.float64)
    result = imresize(image, scale)
    assert result.shape == (math.ceil(13 * scale), math.ceil(11 * scale))
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-9)


def test_imresize_keeps_constants_batches_and_dtype():
    image = torch.full((2, 1, 9, 12), 0.3, dtype=torch.float32)
    small = imresize(image, 1 / 3)
    assert small.shape == (2, 1, 3, 4) and small.dtype == torch.float32
    torch.testing.assert_close(small, torch.full_like(small, 0.3))
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 2, 6, 7, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(imresize(batch, 2.0)[1, 0], imresize(batch[1, 0], 2.0))


def test_imresize_rejects_bad_input():
    with pytest.raises(ValueError, match="floating-point"):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), 2.0)
    with pytest.raises(ValueError, match="scale"):
        imresize(torch.zeros(4, 4), -1.0)
    with pytest.raises(TypeError, match="image"):
        imresize([[0.0]], 2.0)


def test_rgb_to_y_uint8_is_matlab_rounded_formula():
    generator = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 5, 6), generator=generator, dtype=torch.uint8)
    y = rgb_to_y(image)
    assert y.shape == (1, 5, 6)
    for r in range(5):
        for c in range(6):
            red, green, blue = (int(v) for v in image[:, r, c])
            exact = 16 + (65.481 * red + 128.553 * green + 24.966 * blue) / 255
            assert y[0, r, c].item() == math.floor(exact + 0.5)
    extremes = torch.tensor([[[0, 255, 255]], [[0, 255, 0]], [[0, 255, 0]]], dtype=torch.uint8)
    assert rgb_to_y(extremes).flatten().tolist() == [16.0, 235.0, 81.0]  # 16 + 65.481


def test_rgb_to_y_float_is_unrounded_formula():
    image = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).view(3, 1, 1)
    expected = 16 + 65.481 * 0.2 + 128.553 * 0.5 + 24.966 * 0.9
    assert rgb_to_y(image).item() == pytest.approx(expected, abs=1e-12)


def test_rgb_to_y_rejects_non_rgb():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        rgb_to_y(torch.zeros(4, 5, 5, dtype=torch.uint8))


def test_modcrop_keeps_top_left_multiple():
    image = torch.arange(7 * 8).view(1, 7, 8)
    cropped = modcrop(image, 3)
    assert cropped.shape == (1, 6, 6)
    assert torch.equal(cropped, image[:, :6, :6])
    with pytest.raises(ValueError, match="scale"):
        modcrop(image, 0)
