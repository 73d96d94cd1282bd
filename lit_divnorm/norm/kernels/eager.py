"""The kernels in eager PyTorch: every device, every dtype, and what ``torch.compile`` fuses.

Local divisive normalization over all channels and positional windows. For ``x`` of shape
``(N, C, *P)``, with ``A`` and ``B`` the box means of the summation and suppression windows
over ``P`` (applied to per-position channel statistics)::

    q1 = mean_c x,  s2 = mean_c (x - q1)^2           (N, 1, *P): two passes, no cancellation
    m  = A(q1)
    e  = B(s2 + (q1 - m)^2)                          = B(mean_c (x - m)^2)
    r  = 1 / sqrt(e + floor),  floor = sigma^2 + eps
    y  = (x - m) * r
    l1 = mean |x - m|                                (optional: the sparsity term)

``stats`` stacks ``q1, m, r`` as one ``(3, N, 1, *P)`` tensor, all that backward needs besides
``x`` (the backward is written by hand; its cost, like the forward's, does not grow with the
windows).

The channel-window field (local response normalization), for ``B_c`` the box mean over a window
of neighbouring channels at each position::

    d = floor + alpha * B_c(x^2),   y = x * d^(-power)

Inputs are float32 or float64 (the operators in :mod:`lit_divnorm.norm.ops` cast half precision
up and switch autocast off before they call in).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lit_divnorm.norm.kernels.box import Border, box_mean, box_mean_adjoint, box_means


def channel_mean(x: Tensor) -> Tensor:
    """``mean_c x`` of ``(N, C, *P)`` as ``(N, 1, *P)``: on the CPU a product with a row of
    ``1/C`` (one BLAS call, faster there than a strided reduction over ``C``), elsewhere and
    under ``torch.compile`` (which fuses it) a plain reduction."""
    if x.is_cpu and x.is_contiguous() and not torch.compiler.is_compiling():
        n, c = x.shape[:2]
        row = torch.full((1, 1, c), 1.0 / c, dtype=x.dtype)
        return torch.matmul(row, x.reshape(n, c, -1)).view(n, 1, *x.shape[2:])
    return x.mean(dim=1, keepdim=True)


def local_forward(
    x: Tensor,
    floor: Tensor | float,
    sum_windows: Sequence[int],
    sup_windows: Sequence[int],
    border: Border,
    sup_divisors: Sequence[int] | None,
    with_l1: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, stats, l1)`` of the module docstring (``l1`` is ``0.`` unless ``with_l1``)."""
    q1 = channel_mean(x)
    spread = channel_mean((x - q1).square())
    m = box_means(q1, sum_windows, border)
    spread = spread + (q1 - m).square()
    r = torch.rsqrt(box_means(spread, sup_windows, border, sup_divisors) + floor)
    v = x - m
    l1 = v.abs().mean() if with_l1 else x.new_zeros(())
    return v * r, torch.stack([q1, m, r]), l1  # (out of place: autograd may run through it)


def local_backward(
    grad_y: Tensor,
    grad_l1: Tensor | None,
    x: Tensor,
    stats: Tensor,
    sum_windows: Sequence[int],
    sup_windows: Sequence[int],
    border: Border,
    sup_divisors: Sequence[int] | None,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``x`` and ``floor`` (``grad_l1``: that of the L1 output, or ``None``).

    With ``v = x - m`` and ``k = 2 B^T(dL/de) / C``::

        dL/de   = -C r^3 mean_c(g v) / 2
        dL/dx_c = g_c r + k v_c + s_c + A^T(dL/dm) / C,   s_c = g_l1 sign(v_c) / numel
        dL/dm   = -sum_c (g_c r + k v_c + s_c)
    """
    q1, m, r = stats.unbind(0)
    channels = x.shape[1]
    v = x - m
    grad_e = channel_mean(grad_y * v) * (-0.5 * channels * r * r * r)
    grad_floor = grad_e.sum()
    k = box_means(grad_e, sup_windows, border, sup_divisors, adjoint=True) * (2.0 / channels)
    grad_m = -channels * (r * channel_mean(grad_y) + k * (q1 - m))
    sparse = None
    if grad_l1 is not None:
        sparse = v.sign().mul_(grad_l1 / x.numel())
        grad_m = grad_m - channels * channel_mean(sparse)
    grad_q1 = box_means(grad_m, sum_windows, border, adjoint=True)
    grad_x = torch.addcmul(grad_q1 / channels, v, k).addcmul_(grad_y, r)
    if sparse is not None:
        grad_x.add_(sparse)
    return grad_x, grad_floor


def local_centre_forward(x: Tensor, sum_windows: Sequence[int], border: Border) -> Tensor:
    """``y = x - A(mean_c x)``: local mean subtraction only (dnms), two passes over ``x``."""
    return x - box_means(channel_mean(x), sum_windows, border)


def local_centre_backward(grad_y: Tensor, sum_windows: Sequence[int], border: Border) -> Tensor:
    """``dL/dx = g - A^T(sum_c g) / C`` of :func:`local_centre_forward`: two passes over ``g``."""
    shift = box_means(channel_mean(grad_y), sum_windows, border, adjoint=True)
    return grad_y - shift


def _channel_box(x: Tensor, width: int, border: Border, divisor: int | None, adjoint: bool):
    """Box means (or their transpose) over the channels of ``(N, C, *P)``."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    op = box_mean_adjoint if adjoint else box_mean
    return op(flat, 1, width, border, divisor).view(x.shape)


def channel_forward(
    x: Tensor,
    floor: Tensor | float,
    width: int,
    border: Border,
    divisor: int | None,
    alpha: float,
    power: float,
) -> Tensor:
    """``y = x * (floor + alpha * B_c(x^2))^(-power)`` (see the module docstring; out of
    place, so that autograd may run through it)."""
    d = _channel_box(x * x, width, border, divisor, adjoint=False) * alpha + floor
    return x * d.pow(-power)


def channel_backward(
    grad_y: Tensor,
    x: Tensor,
    floor: Tensor | float,
    width: int,
    border: Border,
    divisor: int | None,
    alpha: float,
    power: float,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``x`` and ``floor``::

    t = -power * g * x * d^(-power - 1)
    dL/dx = g * d^(-power) + 2 * alpha * x * B_c^T(t),   dL/dfloor = sum t
    """
    d = _channel_box(x * x, width, border, divisor, adjoint=False).mul_(alpha).add_(floor)
    factor = d.pow(-power)
    t = (grad_y * x).mul_(factor).div_(d).mul_(-power)
    spread = _channel_box(t, width, border, divisor, adjoint=True)
    grad_x = torch.addcmul(grad_y * factor, spread, x, value=2.0 * alpha)
    return grad_x, t.sum()


@functools.cache
def compiled(name: str) -> Callable[..., Any]:
    """One of this module's kernels through ``torch.compile`` (cached: one compile per shape)."""
    kernels = {
        "local_forward": local_forward,
        "local_backward": local_backward,
        "channel_forward": channel_forward,
        "channel_backward": channel_backward,
    }
    return torch.compile(kernels[name], dynamic=None)
