"""Matlab's image operations as the super-resolution field uses them, in torch.

Published SR numbers (SRCNN, A+, VDSR, Ren et al. 2017) are measured on images degraded by
Matlab's ``rgb2ycbcr`` and ``imresize(..., 'bicubic')``. PIL's and torch's bicubic differ from
Matlab's (kernel constant, antialiasing, border), which moves PSNR by tenths of a dB, so this
module re-implements Matlab's definitions:

* :func:`rgb_to_y`: the luma of ITU-R BT.601 YCbCr, in the 0-255 range::

      Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255        (R, G, B in 0..255)

  rounded to an integer for ``uint8`` input, as Matlab's ``rgb2ycbcr`` returns ``uint8`` for
  ``uint8`` images (round half away from zero).
* :func:`imresize`: Matlab's ``imresize(image, scale, 'bicubic')`` for a scale factor: the
  cubic convolution kernel with ``a = -0.5``; when shrinking (``scale < 1``) the kernel is
  stretched by ``1 / scale`` and scaled by ``scale`` (antialiasing); output pixel ``x``
  (1-based) maps to input coordinate ``u = x / scale + (1 - 1 / scale) / 2``; taps outside the
  image are mirrored symmetrically (``..., 2, 1, 1, 2, ..., n, n, n-1, ...``); the weights of
  each output pixel are normalized to sum to 1. Rows are resized first, then columns.
* :func:`modcrop`: crop height and width down to multiples of the scale (bottom/right).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CUBIC_A = -0.5
YCBCR_Y_WEIGHTS = (65.481, 128.553, 24.966)
YCBCR_Y_OFFSET = 16.0


def cubic_kernel(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with ``a = -0.5`` (Matlab's ``cubic``), elementwise.

    ``k(x) = 1.5|x|^3 - 2.5|x|^2 + 1`` for ``|x| <= 1``,
    ``-0.5|x|^3 + 2.5|x|^2 - 4|x| + 2`` for ``1 < |x| <= 2``, ``0`` beyond.
    """
    a = CUBIC_A
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = ((a + 2) * ax3 - (a + 3) * ax2 + 1) * (ax <= 1)
    far = (a * ax3 - 5 * a * ax2 + 8 * a * ax - 4 * a) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_weights(in_length: int, out_length: int, scale: float, antialias: bool = True) -> Tensor:
    """The ``(out_length, in_length)`` matrix ``M`` of Matlab's bicubic resize along one axis.

    ``output = M @ input`` along that axis. Follows Matlab's ``contributions``: taps
    ``floor(u - width / 2) + (0 .. ceil(width) + 1)`` around ``u``, weights normalized per
    row, out-of-range taps mirrored (symmetric padding) and accumulated onto their mirror.
    Float64.
    """
    _check_positive_int("in_length", in_length)
    _check_positive_int("out_length", out_length)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    kernel_width = 4.0
    shrink = antialias and scale < 1
    if shrink:
        kernel_width /= scale
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    distance = u[:, None] - indices
    weights = scale * cubic_kernel(scale * distance) if shrink else cubic_kernel(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    mirrored = _mirror(indices.long() - 1, in_length)
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, mirrored, weights)
    return matrix


def _mirror(index: Tensor, length: int) -> Tensor:
    """Symmetric mirroring of 0-based indices: ``-1 -> 0, -2 -> 1, length -> length - 1``."""
    period = 2 * length
    index = torch.remainder(index, period)
    return torch.where(index < length, index, period - 1 - index)


def imresize(image: Tensor, scale: float, antialias: bool = True) -> Tensor:
    """Matlab's ``imresize(image, scale, 'bicubic')`` on the last two dimensions.

    Args:
        image: ``(..., H, W)`` floating-point tensor (any range; not clipped or rounded, as
            Matlab does for ``double`` input).
        scale: the scale factor, e.g. ``1 / 3`` to shrink and ``3`` to enlarge; the output is
            ``(..., ceil(H * scale), ceil(W * scale))`` as in Matlab.
        antialias: Matlab's ``'Antialiasing'`` option (on by default for bicubic).

    Returns:
        the resized ``(..., H', W')`` tensor, computed in float64 and returned in the input's
        dtype.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim < 2 or not image.is_floating_point():
        raise ValueError(
            f"image must be a floating-point tensor of shape (..., H, W), got dtype "
            f"{image.dtype} and shape {tuple(image.shape)}"
        )
    height, width = image.shape[-2:]
    out_height, out_width = _output_length(height, scale), _output_length(width, scale)
    rows = resize_weights(height, out_height, scale, antialias).to(image.device)
    cols = resize_weights(width, out_width, scale, antialias).to(image.device)
    result = rows @ image.to(torch.float64)
    result = result @ cols.T
    return result.to(image.dtype)


def _output_length(length: int, scale: float) -> int:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return max(1, math.ceil(length * scale))


def rgb_to_y(image: Tensor) -> Tensor:
    """The Y (luma) channel of Matlab's ``rgb2ycbcr``, in the 0-255 range.

    Args:
        image: ``(..., 3, H, W)`` RGB; ``uint8`` (0..255) or floating point (0..1).

    Returns:
        ``(..., 1, H, W)`` float64 ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` on 0..255
        values; for ``uint8`` input rounded half away from zero like Matlab's ``uint8``
        result. Floating-point input is not rounded.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(
            f"image must have shape (..., 3, H, W) (RGB channels first), got {tuple(image.shape)}"
        )
    is_uint8 = image.dtype == torch.uint8
    if not is_uint8 and not image.is_floating_point():
        raise TypeError(f"image must be uint8 or floating point, got dtype {image.dtype}")
    rgb = image.to(torch.float64)
    if not is_uint8:
        rgb = rgb * 255.0
    wr, wg, wb = YCBCR_Y_WEIGHTS
    red, green, blue = rgb.unbind(dim=-3)
    luma = YCBCR_Y_OFFSET + (wr * red + wg * green + wb * blue) / 255.0
    if is_uint8:
        luma = torch.floor(luma + 0.5)
    return luma.unsqueeze(-3)


def modcrop(image: Tensor, scale: int) -> Tensor:
    """Crop ``(..., H, W)`` to ``(..., H - H % scale, W - W % scale)`` (keep top-left)."""
    _check_positive_int("scale", scale)
    height, width = image.shape[-2:]
    return image[..., : height - height % scale, : width - width % scale]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
