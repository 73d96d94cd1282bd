"""Box means: the mean over a window of neighbours along one axis, and its transpose.

A window of width ``k`` at position ``j`` covers ``j - (k - 1) // 2`` to ``j + k // 2``
(TensorFlow's SAME placement: 29 left and 30 right for ``k = 60``). ``border="valid"``
averages over the positions inside the tensor; ``border="reference"`` counts outside
positions as zeros and divides by ``divisor`` (default ``k``), as the authors' code does.

The cost never grows with the window: a product with a cached ``(L, L)`` matrix for axes of
length ``L <= MATRIX_MAX_LENGTH``, running sums beyond.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Border = Literal["valid", "reference"]

MATRIX_MAX_LENGTH = 1024


def box_matrix(
    length: int,
    width: int,
    border: Border,
    divisor: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``(L, L)`` matrix ``M`` with ``(M @ x)[j]`` the box mean of ``x`` at ``j``: cached in
    eager mode, built in the graph under ``torch.compile`` (see :func:`_cached_box_matrix`)
    and afresh under ``torch.func`` transforms (a tensor made there is the transform's, and
    would outlive it in the cache)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _build_box_matrix(length, width, border, divisor, device, dtype)
    return _cached_box_matrix(length, width, border, divisor, device, dtype)


@functools.lru_cache(maxsize=256)
def _cached_box_matrix(
    length: int,
    width: int,
    border: Border,
    divisor: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    with torch.inference_mode(False):
        return _build_box_matrix(length, width, border, divisor, device, dtype)


def _build_box_matrix(
    length: int,
    width: int,
    border: Border,
    divisor: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``(L, L)`` matrix ``M`` with ``(M @ x)[j]`` the box mean of ``x`` at ``j`` (cached).

    ``M[j, k] = 1 / n_j`` for ``k`` in the window of ``j``: ``n_j`` counts the positions inside
    (``"valid"``) or is ``divisor`` (default ``width``, ``"reference"``).
    """
    index = torch.arange(length)
    offset = index[None, :] - index[:, None]
    inside = ((offset >= -((width - 1) // 2)) & (offset <= width // 2)).double()
    if border == "valid":
        matrix = inside / inside.sum(dim=1, keepdim=True)
    else:
        matrix = inside / (width if divisor is None else divisor)
    return matrix.to(device=device, dtype=dtype)


def _running_box_sum(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """Sums of ``x[j - before : j + after + 1]`` along ``dim`` (clipped) by running sums (in
    float64: a float32 running sum of large values loses the differences between them)."""
    low, high = _window_limits(x.shape[dim], before, after, x.device)
    running = torch.cumsum(x, dim, dtype=torch.float64)
    running = torch.cat([torch.zeros_like(running.narrow(dim, 0, 1)), running], dim)
    return (running.index_select(dim, high) - running.index_select(dim, low)).to(x.dtype)


def _window_limits(length: int, before: int, after: int, device: torch.device):
    index = torch.arange(length, device=device)
    return (index - before).clamp(min=0), (index + after + 1).clamp(max=length)


def _window_counts(x: Tensor, dim: int, width: int) -> Tensor:
    """Positions inside ``x`` of each window along ``dim``, shaped to broadcast against it."""
    low, high = _window_limits(x.shape[dim], (width - 1) // 2, width // 2, x.device)
    shape = [1] * x.ndim
    shape[dim] = -1
    return (high - low).to(x.dtype).view(shape)


def _matmul_along(x: Tensor, matrix: Tensor, dim: int) -> Tensor:
    if dim == x.ndim - 1:
        return x @ matrix.T
    return (matrix @ x.movedim(dim, -2)).movedim(-2, dim)


def box_mean(
    x: Tensor, dim: int, width: int, border: Border = "valid", divisor: int | None = None
) -> Tensor:
    """Mean of ``x`` over a window of ``width`` neighbours along ``dim`` (same shape as ``x``).

    The window at ``j`` covers ``j - (width - 1) // 2`` to ``j + width // 2`` (TensorFlow's
    SAME placement). ``border="valid"`` divides by the number of positions inside the tensor;
    ``"reference"`` by ``divisor`` (default ``width``), counting outside positions as zeros.
    The cost does not grow with ``width``: a product with a cached ``(L, L)`` matrix for
    ``L <= MATRIX_MAX_LENGTH``, running sums beyond.
    """
    length = x.shape[dim]
    if length <= MATRIX_MAX_LENGTH:
        matrix = box_matrix(length, width, border, divisor, x.device, x.dtype)
        return _matmul_along(x, matrix, dim)
    total = _running_box_sum(x, dim, (width - 1) // 2, width // 2)
    return total / (_window_counts(x, dim, width) if border == "valid" else (divisor or width))


def box_mean_adjoint(
    g: Tensor, dim: int, width: int, border: Border = "valid", divisor: int | None = None
) -> Tensor:
    """The transpose of :func:`box_mean` (its backward): ``sum_{j: i in window(j)} g_j / n_j``."""
    length = g.shape[dim]
    if length <= MATRIX_MAX_LENGTH:
        matrix = box_matrix(length, width, border, divisor, g.device, g.dtype)
        return _matmul_along(g, matrix.T, dim)
    g = g / (_window_counts(g, dim, width) if border == "valid" else (divisor or width))
    return _running_box_sum(g, dim, width // 2, (width - 1) // 2)


def box_means(
    x: Tensor,
    windows: Sequence[int],
    border: Border = "valid",
    divisors: Sequence[int] | None = None,
    adjoint: bool = False,
) -> Tensor:
    """Box means (or their transpose) over the positional axes ``2, 3, ...`` of ``x``, one
    window per axis; ``divisors`` replace the windows in the divisors of ``"reference"``."""
    divisors = windows if divisors is None else divisors
    op = box_mean_adjoint if adjoint else box_mean
    for dim, (width, divisor) in enumerate(zip(windows, divisors, strict=True), start=2):
        x = op(x, dim, width, border, divisor)
    return x
