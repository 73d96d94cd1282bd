"""Fused divisive normalization over all channels and local positional windows.

For ``x`` of shape ``(N, C, *P)``, with ``A`` and ``B`` the box means of the summation and
suppression windows over ``P`` (applied to per-position channel means)::

    q1 = mean_c x,  q2 = mean_c x^2                  (N, 1, *P)
    m  = A(q1)
    e  = B(q2 - q1^2 + (q1 - m)^2)                    = B(mean_c (x - m)^2)
    r  = 1 / sqrt(e + floor),  floor = sigma^2 + eps
    y  = (x - m) * r
    l1 = mean |x - m|                                 (optional: the sparsity term)

Forward and backward make a fixed number of passes over ``x`` whatever the windows, and only
``x`` and three ``(N, 1, *P)`` statistics are saved for backward (the backward is written by
hand). Three implementations of the same two functions, chosen per call:

- float32/float64 on the CPU: the C++ kernel of :mod:`lit_divnorm.norm.native` (two passes
  each way, one sample at a time so that the second pass reads from cache);
- ``compile_kernel=True``: :func:`local_forward`/:func:`local_backward` through
  ``torch.compile``, which fuses their passes (a one-off compile per input shape; the way to
  a fused kernel on a GPU);
- otherwise (GPU, other dtypes, no C++ compiler): the same functions in eager PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lit_divnorm.norm import native
from lit_divnorm.norm.box import MATRIX_MAX_LENGTH, Border, box_matrix, box_means

BoxOp = Callable[[Tensor], Tensor]


def channel_mean(x: Tensor) -> Tensor:
    """``mean_c x`` of ``(N, C, *P)`` as ``(N, 1, *P)``, by a product with a row of ``1/C``
    (a BLAS call: faster on a CPU than a strided reduction over ``C``)."""
    n, c = x.shape[:2]
    row = torch.full((1, 1, c), 1.0 / c, dtype=x.dtype, device=x.device)
    return torch.matmul(row, x.reshape(n, c, -1)).view(n, 1, *x.shape[2:])


def reduced_channel_mean(x: Tensor) -> Tensor:
    """``mean_c x`` as a plain reduction, which ``torch.compile`` fuses with its producer."""
    return x.mean(dim=1, keepdim=True)


def local_forward(
    x: Tensor,
    floor: Tensor,
    box_sum: BoxOp,
    box_sup: BoxOp,
    with_l1: bool,
    mean_c: BoxOp = channel_mean,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``(y, q1, m, r, l1)`` of the module docstring (``l1`` is ``None`` unless asked)."""
    q1 = mean_c(x)
    buffer = x * x  # reused for the output: one allocation of x's size, not two
    q2 = mean_c(buffer)
    m = box_sum(q1)
    spread = (q2 - q1 * q1).clamp(min=0) + (q1 - m).square()
    r = torch.rsqrt(box_sup(spread) + floor)
    if not with_l1:
        return torch.addcmul(-(m * r), x, r, out=buffer), q1, m, r, None
    v = torch.sub(x, m, out=buffer)
    l1 = v.abs().mean()
    return v.mul_(r), q1, m, r, l1


def local_backward(
    grad_y: Tensor,
    grad_l1: Tensor | None,
    x: Tensor,
    q1: Tensor,
    m: Tensor,
    r: Tensor,
    box_sum_t: BoxOp,
    box_sup_t: BoxOp,
    mean_c: BoxOp = channel_mean,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``x`` and ``floor`` (``box_*_t`` are the transposed box means).

    With ``v = x - m`` and ``k = 2 B^T(dL/de) / C``::

        dL/dx_c = g_c r + k v_c + s_c + A^T(dL/dm) / C,   s_c = g_l1 sign(v_c) / numel
        dL/dm   = -sum_c (g_c r + k v_c + s_c)
    """
    channels = x.shape[1]
    mean_g = mean_c(grad_y)
    buffer = grad_y * x  # reused for grad_x
    mean_gx = mean_c(buffer)
    grad_e = (mean_gx - m * mean_g) * (-0.5 * channels * r * r * r)
    grad_floor = grad_e.sum()
    k = box_sup_t(grad_e) * (2.0 / channels)
    grad_m = -channels * (r * mean_g + k * (q1 - m))
    sparse = None
    if grad_l1 is not None:
        sparse = torch.sub(x, m).sign_().mul_(grad_l1 / x.numel())
        grad_m = grad_m - channels * mean_c(sparse)
    grad_q1 = box_sum_t(grad_m)
    grad_x = torch.addcmul(grad_q1 / channels - m * k, x, k, out=buffer)
    grad_x.addcmul_(grad_y, r)
    if sparse is not None:
        grad_x.add_(sparse)
    return grad_x, grad_floor


def _matrix_box(x: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    for dim, matrix in enumerate(matrices, start=2):
        x = x @ matrix.T if dim == x.ndim - 1 else (matrix @ x.movedim(dim, -2)).movedim(-2, dim)
    return x


def _compiled_forward(x, floor, sum_mats, sup_mats, with_l1):
    box_sum = functools.partial(_matrix_box, matrices=sum_mats)
    box_sup = functools.partial(_matrix_box, matrices=sup_mats)
    return local_forward(x, floor, box_sum, box_sup, with_l1, reduced_channel_mean)


def _compiled_backward(grad_y, grad_l1, x, q1, m, r, sum_mats_t, sup_mats_t):
    box_sum_t = functools.partial(_matrix_box, matrices=sum_mats_t)
    box_sup_t = functools.partial(_matrix_box, matrices=sup_mats_t)
    return local_backward(grad_y, grad_l1, x, q1, m, r, box_sum_t, box_sup_t, reduced_channel_mean)


@functools.cache
def _compiled(name: str) -> Callable[..., Any]:
    target = {"forward": _compiled_forward, "backward": _compiled_backward}[name]
    return torch.compile(target, dynamic=None)


class LocalDivisiveNorm(torch.autograd.Function):
    """``(y, l1)`` of the module docstring with a hand-written backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        floor: float | Tensor,
        sum_windows: tuple[int, ...],
        sup_windows: tuple[int, ...],
        border: Border,
        sup_divisors: tuple[int, ...] | None,
        with_l1: bool,
        compile_kernel: bool,
    ) -> tuple[Tensor, Tensor]:
        config = (sum_windows, sup_windows, border, sup_divisors)
        path = _choose_path(x, compile_kernel)
        if path == "native":
            y, stats, total = native.forward(x, float(floor), *config, with_l1)
            l1 = x.new_tensor(total / x.numel()) if with_l1 else None
            ctx.save_for_backward(x, stats)
        else:
            if not isinstance(floor, Tensor):
                floor = torch.tensor(floor, dtype=x.dtype, device=x.device)
            if path == "compiled":
                sum_mats, sup_mats = _matrices(x, *config)
                y, q1, m, r, l1 = _compiled("forward")(x, floor, sum_mats, sup_mats, with_l1)
            else:
                box_sum = functools.partial(box_means, windows=sum_windows, border=border)
                box_sup = functools.partial(
                    box_means, windows=sup_windows, border=border, divisors=sup_divisors
                )
                y, q1, m, r, l1 = local_forward(x, floor, box_sum, box_sup, with_l1)
            ctx.save_for_backward(x, q1, m, r)
        ctx.config = config
        ctx.path = path
        ctx.with_l1 = with_l1
        if l1 is None:
            l1 = x.new_zeros(())
            ctx.mark_non_differentiable(l1)
        return y, l1

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, grad_l1: Tensor) -> tuple[Tensor | None, ...]:
        sum_windows, sup_windows, border, sup_divisors = ctx.config
        grad_l1 = grad_l1 if ctx.with_l1 else None
        if ctx.path == "native":
            x, stats = ctx.saved_tensors
            coef = None if grad_l1 is None else float(grad_l1) / x.numel()
            coef = coef or None  # an L1 term outside the loss: skip its sign passes
            grad_x, floor_total = native.backward(grad_y, x, stats, *ctx.config, coef)
            floor_grad = grad_y.new_tensor(floor_total) if ctx.needs_input_grad[1] else None
            return grad_x, floor_grad, None, None, None, None, None, None
        x, q1, m, r = ctx.saved_tensors
        if ctx.path == "compiled":
            sum_mats, sup_mats = _matrices(x, *ctx.config)
            transposed = ([mat.T for mat in sum_mats], [mat.T for mat in sup_mats])
            grads = _compiled("backward")(grad_y, grad_l1, x, q1, m, r, *transposed)
        else:
            box_sum_t = functools.partial(
                box_means, windows=sum_windows, border=border, adjoint=True
            )
            box_sup_t = functools.partial(
                box_means, windows=sup_windows, border=border, divisors=sup_divisors, adjoint=True
            )
            grads = local_backward(grad_y, grad_l1, x, q1, m, r, box_sum_t, box_sup_t)
        grad_x, grad_floor = grads
        grad_floor = grad_floor if ctx.needs_input_grad[1] else None
        return grad_x, grad_floor, None, None, None, None, None, None


def _choose_path(x: Tensor, compile_kernel: bool) -> str:
    """``"compiled"`` when asked (and the box matrices apply), else ``"native"`` (the C++
    passes) for float32/float64 CPU tensors, else ``"torch"``."""
    if compile_kernel and max(x.shape[2:]) <= MATRIX_MAX_LENGTH:
        return "compiled"
    return "native" if native.applies(x) else "torch"


def _matrices(
    x: Tensor,
    sum_windows: tuple[int, ...],
    sup_windows: tuple[int, ...],
    border: Border,
    sup_divisors: tuple[int, ...] | None,
) -> tuple[list[Tensor], list[Tensor]]:
    lengths = x.shape[2:]
    divisors = sup_divisors or sup_windows
    sum_mats = [
        box_matrix(n, w, border, w, x.device, x.dtype)
        for n, w in zip(lengths, sum_windows, strict=True)
    ]
    sup_mats = [
        box_matrix(n, w, border, d, x.device, x.dtype)
        for n, w, d in zip(lengths, sup_windows, divisors, strict=True)
    ]
    return sum_mats, sup_mats


def local_divisive_norm(
    x: Tensor,
    sum_windows: tuple[int, ...],
    sup_windows: tuple[int, ...],
    floor: float | Tensor,
    border: Border = "valid",
    sup_divisors: tuple[int, ...] | None = None,
    with_l1: bool = False,
    compile_kernel: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(y, mean|x - m|)`` for ``x`` of shape ``(N, C, *P)`` (see the module docstring);
    the second output is ``0.`` unless ``with_l1``."""
    if isinstance(floor, Tensor):
        floor = floor.to(x.dtype)
    return LocalDivisiveNorm.apply(
        x,
        floor,
        tuple(sum_windows),
        tuple(sup_windows),
        border,
        sup_divisors,
        with_l1,
        compile_kernel,
    )
