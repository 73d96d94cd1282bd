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

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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


MATRIX_MAX_LENGTH = 1024


@functools.lru_cache(maxsize=256)
def box_matrix(
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
    with torch.inference_mode(False):
        index = torch.arange(length)
        offset = index[None, :] - index[:, None]
        inside = ((offset >= -((width - 1) // 2)) & (offset <= width // 2)).double()
        if border == "valid":
            matrix = inside / inside.sum(dim=1, keepdim=True)
        else:
            matrix = inside / (width if divisor is None else divisor)
        return matrix.to(device=device, dtype=dtype)


def _running_box_sum(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """Sums of ``x[j - before : j + after + 1]`` along ``dim`` (clipped) by running sums."""
    low, high = _window_limits(x.shape[dim], before, after, x.device)
    running = torch.cumsum(x, dim)
    running = torch.cat([torch.zeros_like(running.narrow(dim, 0, 1)), running], dim)
    return running.index_select(dim, high) - running.index_select(dim, low)


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


def field_mean(
    x: Tensor,
    field: Field,
    border: Border = "valid",
    divisor_window: Sequence[int] | None = None,
    sync_batch: bool = False,
) -> Tensor:
    """Mean of ``x`` over ``field`` for every unit; broadcasts to ``x``'s shape.

    ``divisor_window`` (``border="reference"`` only) replaces the positional window's area in
    the divisor, to reproduce the authors' suppression-window quirk. With ``sync_batch`` and
    an initialized process group, a field that spans the batch spans the batches of every
    rank (a differentiable all-reduce, as ``SyncBatchNorm`` does).
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
    if field.positions == "all" and positions:
        mean = mean.mean(dim=positions, keepdim=True)
    if field.batch:
        mean = _batch_mean(mean, sync_batch)
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


def sync_world_size(sync_batch: bool) -> int:
    """Ranks a synchronized batch statistic spans (1 without an initialized process group)."""
    if not sync_batch or not torch.distributed.is_available():
        return 1
    if not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size()


def _batch_mean(x: Tensor, sync_batch: bool) -> Tensor:
    if sync_world_size(sync_batch) == 1:
        return x.mean(dim=0, keepdim=True)
    from torch.distributed.nn.functional import all_reduce

    total = all_reduce(x.sum(dim=0, keepdim=True))
    return total / _global_batch_size(x)


def _global_batch_size(x: Tensor) -> Tensor:
    count = torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)
    torch.distributed.all_reduce(count)
    return count


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
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    return_centered: bool = False,
    fused: bool = True,
    sync_batch: bool = False,
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
        weight, bias: per-channel ``(C,)`` affine ``gamma``, ``beta`` applied to ``y``.
        return_centered: also return ``v = x - mean_A(x)`` (in float32 for half inputs),
            the activation the L1 sparsity penalty is taken on.
        fused: use a fused implementation where one applies (torch's batch/group norm
            kernels for bn/ln/in/gn with a fixed sigma, :class:`LocalDivisiveNorm` for local
            fields over all channels); ``False`` evaluates the equations term by term.
        sync_batch: fields that span the batch span every rank's batch (see
            :func:`field_mean`); only matters under an initialized process group.

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
    stats = (running_mean, running_var, training, momentum)
    y = None
    if fused and not (sync_batch and _spans_batch(sum_field, sup_field)):
        y = _fused_norm(x, sum_field, sup_field, sigma, eps, border, weight, bias, *stats)
    if y is None:
        y, v = _direct_norm(x, sum_field, sup_field, sigma, eps, border, *stats, sync_batch)
        if weight is not None or bias is not None:
            y = _affine(y, weight, bias)
    elif return_centered:
        v = x
        if sum_field is not None:
            mean = _batch_statistic(
                x, sum_field, border, None, running_mean, training, momentum, None, update=False
            )
            v = x - mean
    y = y.to(dtype)
    return (y, v) if return_centered else y


def _spans_batch(*fields: Field | None) -> bool:
    return any(field is not None and field.batch for field in fields)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = (1, -1) + (1,) * (y.ndim - 2)
    if weight is not None and bias is not None:
        return torch.addcmul(bias.view(shape), y, weight.view(shape))
    if weight is not None:
        return y * weight.view(shape)
    return y + bias.view(shape)


def _direct_norm(
    x: Tensor,
    sum_field: Field | None,
    sup_field: Field | None,
    sigma: float | Tensor,
    eps: float,
    border: Border,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    sync_batch: bool = False,
) -> tuple[Tensor, Tensor]:
    """The framework's equations term by term (the reference the fused paths are tested on)."""
    v = x
    if sum_field is not None:
        mean = _batch_statistic(
            x, sum_field, border, None, running_mean, training, momentum, None, True, sync_batch
        )
        v = x - mean
    y = v
    if sup_field is not None:
        divisor = suppression_divisor(sum_field, sup_field, border, x.ndim - 2)
        unbias = sum_field is not None and sum_field.batch
        energy = _batch_statistic(
            v * v, sup_field, border, divisor, running_var, training, momentum, unbias, True,
            sync_batch,
        )  # fmt: skip
        y = v * torch.rsqrt(energy + (sigma * sigma + eps))
    return y, v


def _batch_statistic(
    x: Tensor,
    field: Field,
    border: Border,
    divisor: tuple[int, ...] | None,
    running: Tensor | None,
    training: bool,
    momentum: float,
    unbias: bool | None,
    update: bool = True,
    sync_batch: bool = False,
) -> Tensor:
    """``field_mean``, or for a batch field with a running buffer, the buffer in eval mode
    (in training the buffer moves towards the batch statistic unless ``update=False``)."""
    world = sync_world_size(sync_batch) if field.batch else 1
    if field.batch and training and world == 1:
        _check_batch_size(x)
    if running is None or not field.batch:
        return field_mean(x, field, border, divisor, sync_batch)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if not training:
        return running.view(shape).to(x.dtype)
    mean = field_mean(x, field, border, divisor, sync_batch)
    if not update:
        return mean
    with torch.no_grad():
        values_per_channel = x.numel() // x.shape[1]
        if world > 1:
            values_per_channel = int(_global_batch_size(x)) * (values_per_channel // x.shape[0])
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


def _fused_norm(
    x: Tensor,
    sum_field: Field | None,
    sup_field: Field | None,
    sigma: float | Tensor,
    eps: float,
    border: Border,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
) -> Tensor | None:
    """A fused kernel for the common fields, or ``None`` where none applies."""
    if _is_channel_local(sum_field) and _is_channel_local(sup_field):
        y = _local_norm(x, sum_field, sup_field, sigma, eps, border)
        return y if weight is None and bias is None else _affine(y, weight, bias)
    if sum_field is None or sup_field != sum_field:
        return None
    if sum_field.positions == "all" and not isinstance(sigma, Tensor):
        floor = sigma * sigma + eps
        if sum_field.batch and sum_field.channels == "self":
            use_batch = training or running_mean is None
            if use_batch:
                _check_batch_size(x)
            return F.batch_norm(
                x, running_mean, running_var, weight, bias, use_batch, momentum, floor
            )
        if not sum_field.batch and sum_field.channels in ("all", "self", "groups"):
            groups = {"all": 1, "self": x.shape[1], "groups": sum_field.groups}[sum_field.channels]
            if x.shape[1] % groups:
                return None  # the direct path raises the clear error
            return F.group_norm(x, groups, weight, bias, eps=floor)
    return None


def _is_channel_local(field: Field | None) -> bool:
    return field is not None and field.is_local and not field.batch and field.channels == "all"


def _local_norm(
    x: Tensor, sum_field: Field, sup_field: Field, sigma: float | Tensor, eps: float, border: Border
) -> Tensor:
    features = x.ndim == 2
    if features:  # feature vectors: the C features are one row of positions
        x = x.unsqueeze(1)
    num = x.ndim - 2
    divisor = suppression_divisor(sum_field, sup_field, border, num)
    floor = sigma * sigma + eps
    if not isinstance(floor, Tensor):
        floor = torch.tensor(floor, dtype=x.dtype, device=x.device)
    y = LocalDivisiveNorm.apply(
        x,
        floor.to(x.dtype),
        sum_field.window_for(num),
        sup_field.window_for(num),
        border,
        divisor,
    )
    return y.squeeze(1) if features else y


def _box(x: Tensor, windows, border: Border, divisors, adjoint: bool = False) -> Tensor:
    divisors = windows if divisors is None else divisors
    op = box_mean_adjoint if adjoint else box_mean
    for dim, (width, divisor) in enumerate(zip(windows, divisors), start=2):
        x = op(x, dim, width, border, divisor)
    return x


def _channel_mean(x: Tensor) -> Tensor:
    """``mean_c x`` of ``(N, C, *P)`` as ``(N, 1, *P)``, by a product with a row of ``1/C``
    (a BLAS call: several times faster on CPU than a strided reduction over ``C``)."""
    n, c = x.shape[:2]
    row = torch.full((1, 1, c), 1.0 / c, dtype=x.dtype, device=x.device)
    return torch.matmul(row, x.reshape(n, c, -1)).view(n, 1, *x.shape[2:])


class LocalDivisiveNorm(torch.autograd.Function):
    """Divisive normalization over all channels and local positional windows, fused.

    For ``x`` of shape ``(N, C, *P)``, with ``A``/``B`` the box means of the summation and
    suppression windows over ``P`` (applied to per-position channel means)::

        q1 = mean_c x,  q2 = mean_c x^2                  (N, 1, *P)
        m  = A(q1)
        e  = B(q2 - q1^2 + (q1 - m)^2)                    = B(mean_c (x - m)^2)
        r  = 1 / sqrt(e + floor),  floor = sigma^2 + eps
        y  = (x - m) * r

    Forward and backward make a fixed number of passes over ``x`` whatever the windows (box
    means are products with small cached matrices on the ``(N, 1, *P)`` maps), and only ``x``
    and three ``(N, 1, *P)`` statistics are saved for backward.
    """

    @staticmethod
    def forward(ctx, x, floor, sum_windows, sup_windows, border, sup_divisors):  # type: ignore[override]
        q1 = _channel_mean(x)
        q2 = _channel_mean(x * x)
        m = _box(q1, sum_windows, border, None)
        spread = (q2 - q1 * q1).clamp_(min=0) + (q1 - m).square()
        r = torch.rsqrt(_box(spread, sup_windows, border, sup_divisors) + floor)
        y = torch.addcmul(-(m * r), x, r)
        ctx.save_for_backward(x, q1, m, r)
        ctx.config = (sum_windows, sup_windows, border, sup_divisors)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, q1, m, r = ctx.saved_tensors
        sum_windows, sup_windows, border, sup_divisors = ctx.config
        channels = x.shape[1]
        mean_g = _channel_mean(grad_y)
        mean_gx = _channel_mean(grad_y * x)
        grad_e = (mean_gx - m * mean_g) * (-0.5 * channels * r * r * r)
        grad_floor = grad_e.sum() if ctx.needs_input_grad[1] else None
        grad_spread = _box(grad_e, sup_windows, border, sup_divisors, adjoint=True)
        k = grad_spread * (2.0 / channels)
        grad_m = -channels * (r * mean_g + k * (q1 - m))
        grad_q1 = _box(grad_m, sum_windows, border, None, adjoint=True)
        grad_x = torch.addcmul(grad_q1 / channels - m * k, x, k)
        grad_x.addcmul_(grad_y, r)
        return grad_x, grad_floor, None, None, None, None
