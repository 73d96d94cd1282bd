"""Pure tensor functions of the unified normalization framework (no module state).

Shapes: every function takes ``x`` of shape ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` (or
more positional dimensions) and returns a tensor of the same shape, or for the means one that
broadcasts to it.

The framework (Ren et al., ICLR 2017, eq. 1-2)::

    v = x - mean_A(x)                                  A: summation field
    y = v / sqrt(sigma^2 + eps + mean_B(v^2))          B: suppression field

Local windows follow TensorFlow's SAME placement: a window of width ``k`` at position ``j``
covers ``j - (k - 1) // 2`` to ``j + k // 2`` (29 left and 30 right for ``k = 60``). At the
border, ``border="valid"`` averages over the positions that lie inside the tensor;
``border="reference"`` reproduces the authors' code: zero padding, always divided by the full
window, and the suppression window divided by the *summation* window's area.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lit_divnorm.norm.fields import Field

Border = Literal["valid", "reference"]
BORDERS: tuple[str, ...] = ("valid", "reference")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_border(border: str) -> None:
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")


def check_input(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (N, C) or (N, C, *positions), got {x.ndim}-D shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def window_bounds(length: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and one-past-last index of the window at each position, clipped to the input."""
    index = torch.arange(length, device=device)
    low = (index - (width - 1) // 2).clamp(min=0)
    high = (index + width // 2 + 1).clamp(max=length)
    return low, high


def box_mean(
    x: Tensor, dim: int, width: int, border: Border = "valid", divisor: int | None = None
) -> Tensor:
    """Mean of ``x`` over a window of ``width`` neighbours along ``dim`` (same shape as ``x``).

    Running sums make the cost independent of ``width``. ``border="valid"`` divides by the
    number of positions inside the tensor; ``"reference"`` by ``divisor`` (default ``width``).
    """
    length = x.shape[dim]
    low, high = window_bounds(length, width, x.device)
    running = torch.cumsum(x, dim)
    zero = torch.zeros_like(running.narrow(dim, 0, 1))
    running = torch.cat([zero, running], dim)
    total = running.index_select(dim, high) - running.index_select(dim, low)
    if border == "valid":
        shape = [1] * x.ndim
        shape[dim] = length
        return total / (high - low).to(x.dtype).view(shape)
    return total / (width if divisor is None else divisor)


def field_mean(
    x: Tensor,
    field: Field,
    border: Border = "valid",
    divisor_window: Sequence[int] | None = None,
) -> Tensor:
    """Mean of ``x`` over ``field`` for every unit; broadcasts to ``x``'s shape.

    ``divisor_window`` (``border="reference"`` only) replaces the positional window's area in
    the divisor, to reproduce the authors' suppression-window quirk.
    """
    if x.ndim == 2 and field.is_local:
        if field.channels not in ("self", "all"):
            raise ValueError(
                "a field with a positional window on feature vectors (N, C) reads the features "
                f"as positions and needs channels 'self' or 'all', got {field.channels!r}"
            )
        local = field.replace(channels="self")
        return field_mean(x.unsqueeze(1), local, border, divisor_window).squeeze(1)

    positions = tuple(range(2, x.ndim))
    mean = x
    if field.batch:
        mean = mean.mean(dim=0, keepdim=True)
    if field.positions == "all" and positions:
        mean = mean.mean(dim=positions, keepdim=True)
    if field.channels == "all":
        mean = mean.mean(dim=1, keepdim=True)
    elif field.channels == "groups":
        mean = _group_mean(mean, field.groups)
    elif field.channels == "window":
        mean = box_mean(mean, 1, field.channel_window, border)
    if field.is_local and positions:
        windows = field.window_for(len(positions))
        divisors = windows if divisor_window is None else tuple(divisor_window)
        for dim, width, divisor in zip(positions, windows, divisors):
            mean = box_mean(mean, dim, width, border, divisor)
    return mean


def _group_mean(x: Tensor, groups: int) -> Tensor:
    channels = x.shape[1]
    if channels % groups != 0:
        raise ValueError(f"groups={groups} must divide the number of channels, got C={channels}")
    grouped = x.reshape(x.shape[0], groups, channels // groups, *x.shape[2:])
    mean = grouped.mean(dim=2, keepdim=True).expand_as(grouped)
    return mean.reshape(x.shape)


def suppression_divisor(
    sum_field: Field | None, sup_field: Field, border: Border, num_positions: int
) -> tuple[int, ...] | None:
    """The authors' quirk: in reference mode the suppression window is divided by the
    summation window's area (only differs when the two windows differ)."""
    if (
        border != "reference"
        or sum_field is None
        or not (sum_field.is_local and sup_field.is_local)
    ):
        return None
    return sum_field.window_for(max(num_positions, 1))


def divisive_norm(
    x: Tensor,
    sum_field: Field | None,
    sup_field: Field | None,
    sigma: float | Tensor = 0.0,
    eps: float = 0.0,
    border: Border = "valid",
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    return_centered: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The unified normalizer: ``y = (x - mean_A(x)) / sqrt(sigma^2 + eps + mean_B(v^2))``.

    Args:
        x: ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``.
        sum_field: summation field ``A``; ``None`` skips centering.
        sup_field: suppression field ``B``; ``None`` means mean subtraction only.
        sigma: smoothing term (``>= 0``; a float or a 0-d tensor, e.g. a learned one).
        eps: numerical floor added under the square root.
        border: ``"valid"`` or ``"reference"`` (see the module docstring).
        running_mean, running_var: ``(C,)`` buffers for a field that spans the batch, as in
            :func:`torch.nn.functional.batch_norm`. When ``training``, the batch statistics
            are used and the buffers move towards them by ``momentum`` (the variance
            unbiased); otherwise the buffers replace the batch statistics.
        return_centered: also return ``v = x - mean_A(x)`` (in float32 for half inputs),
            the activation the L1 sparsity penalty is taken on.

    Returns:
        ``y`` with ``x``'s shape and dtype (float16/bfloat16 inputs are normalized in
        float32 and cast back), or ``(y, v)`` with ``return_centered``.
    """
    check_input(x)
    check_border(border)
    if not isinstance(sigma, Tensor) and (not math.isfinite(sigma) or sigma < 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    dtype = x.dtype
    if dtype in _LOW_PRECISION:
        x = x.float()
    v = x
    if sum_field is not None:
        mean = _batch_statistic(x, sum_field, border, None, running_mean, training, momentum, None)
        v = x - mean
    y = v
    if sup_field is not None:
        divisor = suppression_divisor(sum_field, sup_field, border, x.ndim - 2)
        unbias = sum_field is not None and sum_field.batch
        energy = _batch_statistic(
            v * v, sup_field, border, divisor, running_var, training, momentum, unbias
        )
        y = v * torch.rsqrt(energy + (sigma * sigma + eps))
    y = y.to(dtype)
    return (y, v) if return_centered else y


def _batch_statistic(
    x: Tensor,
    field: Field,
    border: Border,
    divisor: tuple[int, ...] | None,
    running: Tensor | None,
    training: bool,
    momentum: float,
    unbias: bool | None,
) -> Tensor:
    """``field_mean``, or for a batch field with a running buffer, the buffer in eval mode."""
    if running is None or not field.batch:
        if field.batch and training:
            _check_batch_size(x)
        return field_mean(x, field, border, divisor)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if not training:
        return running.view(shape).to(x.dtype)
    _check_batch_size(x)
    mean = field_mean(x, field, border, divisor)
    with torch.no_grad():
        values_per_channel = x.numel() // x.shape[1]
        statistic = mean.expand(1, x.shape[1], *mean.shape[2:]).reshape(x.shape[1])
        if unbias:
            statistic = statistic * values_per_channel / (values_per_channel - 1)
        running.lerp_(statistic.to(running.dtype), momentum)
    return mean


def _check_batch_size(x: Tensor) -> None:
    if x.numel() == x.shape[1]:
        raise ValueError(
            "a field that spans the batch needs more than 1 value per channel when training, "
            f"got input shape {tuple(x.shape)}"
        )
