"""Pooling with TensorFlow's ``padding="SAME"`` semantics.

For an input of length ``L``, kernel ``k`` and stride ``s`` the output has ``ceil(L / s)``
positions; the total padding ``max((ceil(L / s) - 1) * s + k - L, 0)`` is split with the
smaller half before and the larger half after (so for 3x3 stride 2 on 32x32: 0 before, 1
after). Max pooling never picks a padded value; average pooling divides by the number of
real (unpadded) inputs in each window. Shapes: ``(N, C, H, W)`` -> ``(N, C, ceil(H/s),
ceil(W/s))``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PoolKind = Literal["max", "avg"]


def same_padding(length: int, kernel: int, stride: int) -> tuple[int, int]:
    """``(before, after)`` padding of TF SAME for one dimension."""
    out = math.ceil(length / stride)
    total = max((out - 1) * stride + kernel - length, 0)
    return total // 2, total - total // 2


def pool2d_same(x: Tensor, kind: PoolKind, kernel: int, stride: int) -> Tensor:
    """Max or average pooling of ``x`` ``(N, C, H, W)`` with TF SAME padding."""
    if kind not in ("max", "avg"):
        raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    top, bottom = same_padding(x.shape[2], kernel, stride)
    left, right = same_padding(x.shape[3], kernel, stride)
    pad = (left, right, top, bottom)
    if kind == "max":
        padded = F.pad(x, pad, value=-math.inf)
        return F.max_pool2d(padded, kernel, stride)
    total = F.avg_pool2d(F.pad(x, pad), kernel, stride)
    ones = torch.ones(1, 1, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
    count = F.avg_pool2d(F.pad(ones, pad), kernel, stride)
    return total / count


class SamePool2d(nn.Module):
    """:func:`pool2d_same` as a module (``kind`` ``"max"`` or ``"avg"``)."""

    def __init__(self, kind: PoolKind, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        if kind not in ("max", "avg"):
            raise ValueError(f"kind must be 'max' or 'avg', got {kind!r}")
        for name, value in (("kernel", kernel), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.kind = kind
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return pool2d_same(x, self.kind, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel={self.kernel}, stride={self.stride}, padding=SAME"
