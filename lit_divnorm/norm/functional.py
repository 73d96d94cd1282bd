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

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_divnorm.norm.fields import PRESETS, Field, Window, normalize_window
from lit_divnorm.norm.kernels.box import Border, box_mean
from lit_divnorm.norm.ops import (
    LocalConfig,
    as_dtype,
    centred_abs_mean,
    channel_divisive_norm,
    check_backend,
    compute_dtype,
    field_kernel_applies,
    field_norm,
    full_precision,
    local_centring,
    local_divisive_norm,
    resolve_backend,
)

BORDERS: tuple[str, ...] = ("valid", "reference")
DEFAULT_EPS = 1e-5


def check_border(border: str) -> None:
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")


def check_exponent(alpha: float, power: float) -> None:
    """``alpha`` and ``power`` of the divisor: finite numbers ``> 0``."""
    for name, value in (("alpha", alpha), ("power", power)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_floor(sigma: float | Tensor, eps: float | Tensor, divides: bool = True) -> None:
    """``sigma`` and ``eps`` of the floor ``sigma^2 + eps``: finite numbers ``>= 0``, not both
    ``0`` when the floor is under a divisor (``divides``: a suppression field), since a
    constant region then divides ``0`` by ``0`` (NaN outputs and gradients). A tensor (a
    learned ``softplus`` sigma, always ``> 0``) is not checked."""
    for name, value in (("sigma", sigma), ("eps", eps)):
        if isinstance(value, Tensor):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    fixed = not isinstance(sigma, Tensor) and not isinstance(eps, Tensor)
    if divides and fixed and sigma == 0 and eps == 0:
        raise ValueError(
            f"sigma={sigma} with eps={eps} puts a floor sigma^2 + eps = 0 under the divisor, so "
            "a constant region gives 0 / 0 (NaN outputs and gradients); allowed: sigma > 0 or "
            "eps > 0 (e.g. eps=1e-5), or a learned sigma (learn_sigma=True, sigma > 0)"
        )


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
    eps: float | Tensor = DEFAULT_EPS,
    border: Border = "valid",
    *,
    alpha: float = 1.0,
    power: float = 0.5,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    return_l1: bool = False,
    fused: bool = True,
    backend: str = "auto",
    sync_batch: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The unified normalizer: ``y = (x - mean_A(x)) / sqrt(sigma^2 + eps + mean_B(v^2))``,
    or with ``alpha`` and ``power`` ``y = v (sigma^2 + eps + alpha mean_B(v^2))^(-power)``.

    Args:
        x: ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``.
        sum_field: summation field ``A``; ``None`` skips centering.
        sup_field: suppression field ``B``; ``None`` means mean subtraction only.
        sigma: smoothing term (``>= 0``; a float or a 0-d tensor, e.g. a learned one).
        eps: numerical floor added under the square root (positive by default, so that a
            constant region gives a finite output even with ``sigma = 0``); a float or a 0-d
            tensor (e.g. a learned one). ``sigma = eps = 0`` with a suppression field raises
            ``ValueError`` (a zero floor: NaN on a constant region).
        border: ``"valid"`` or ``"reference"`` (see the module docstring).
        alpha: scale of the suppression term (``> 0``; local response normalization's
            ``alpha``: torch's ``LocalResponseNorm(n, alpha, beta, k)`` is ``alpha``, ``power =
            beta``, ``sigma^2 + eps = k`` and ``border="reference"`` on a channel window).
        power: exponent of the divisor (``> 0``; ``0.5``: the square root).
        running_mean, running_var: ``(C,)`` buffers for a field that spans the batch, as in
            :func:`torch.nn.functional.batch_norm`. When ``training``, the batch statistics
            are used and the buffers move towards them by ``momentum`` (the variance
            unbiased); otherwise the buffers replace the batch statistics. They may have any
            floating dtype (they are updated in their own).
        weight, bias: per-channel ``(C,)`` affine ``gamma``, ``beta`` applied to ``y``.
        return_l1: also return ``mean|v|`` with ``v = x - mean_A(x)`` (``x`` itself without a
            summation field): the activation the L1 sparsity penalty is taken on.
        fused: use a fused implementation where one applies (torch's batch/group norm
            kernels for bn/ln/in/gn with a fixed sigma; the operators of
            :mod:`lit_divnorm.norm.ops` for local fields over all channels and for the
            channel-window field); ``False`` evaluates the equations term by term.
        backend: which kernels run the operators (:data:`lit_divnorm.norm.ops.BACKENDS`:
            ``"auto"``, ``"native"``, ``"triton"``, ``"compile"``, ``"torch"``); a backend that
            cannot run on ``x``'s device raises ``ValueError``.
        sync_batch: fields that span the batch span every rank's batch (see
            :func:`field_mean`); only matters under an initialized process group.

    Returns:
        ``y`` with ``x``'s shape and dtype, or ``(y, mean|v|)`` with ``return_l1``. Every
        statistic is computed in float32 or better, whatever ``x``'s dtype and the autocast
        state (float16/bfloat16 inputs are normalized in float32 and cast back).
    """
    check_input(x)
    check_border(border)
    check_backend(backend)
    # Python number checks only on concrete values: under torch.compile(dynamic=True) sigma,
    # eps, alpha and power may be symbolic floats, which math.isfinite cannot read (the
    # layers check theirs when built; the operators check the device when they run)
    if not torch.compiler.is_compiling():
        check_floor(sigma, eps, divides=sup_field is not None)
        check_exponent(alpha, power)
        resolve_backend(backend, x)
    dtype = compute_dtype(x.dtype)
    if isinstance(sigma, Tensor):
        sigma = as_dtype(sigma, dtype)
    if isinstance(eps, Tensor):
        eps = as_dtype(eps, dtype)
    square_root = alpha == 1.0 and power == 0.5
    with full_precision(x.device.type):
        if fused and square_root and _is_channel_local(sum_field) and _is_channel_local(sup_field):
            y, l1 = _local_norm(x, sum_field, sup_field, sigma, eps, border, return_l1, backend)
            y = as_dtype(affine(y, weight, bias), x.dtype)
            return (y, l1) if return_l1 else y
        if fused and sum_field is None and _is_channel_window(sup_field):
            floor = sigma * sigma + eps
            width = sup_field.channel_window
            y = channel_divisive_norm(
                x, width, floor, border, alpha=alpha, power=power, backend=backend
            )
            y = as_dtype(affine(y, weight, bias), x.dtype)
            return (y, x.abs().mean(dtype=dtype)) if return_l1 else y
        y, l1 = _full_precision_norm(
            as_dtype(x, dtype), sum_field, sup_field, sigma, eps, border, alpha, power,
            running_mean, running_var, training, momentum, weight, bias, return_l1, fused,
            sync_batch, backend,
        )  # fmt: skip
    y = as_dtype(y, x.dtype)
    return (y, l1) if return_l1 else y


def _full_precision_norm(
    x: Tensor,
    sum_field: Field | None,
    sup_field: Field | None,
    sigma: float | Tensor,
    eps: float | Tensor,
    border: Border,
    alpha: float,
    power: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    weight: Tensor | None,
    bias: Tensor | None,
    return_l1: bool,
    fused: bool,
    sync_batch: bool,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """The fields over whole groups of units (the C++ kernel where it applies, torch's own
    kernels), or the equations term by term, on ``x`` in its compute dtype (parameters and
    running statistics are brought to it and written back)."""
    weight = None if weight is None else as_dtype(weight, x.dtype)
    bias = None if bias is None else as_dtype(bias, x.dtype)
    stats_in = (running_mean, running_var)
    running_mean = None if running_mean is None else as_dtype(running_mean, x.dtype)
    running_var = None if running_var is None else as_dtype(running_var, x.dtype)
    stats = (running_mean, running_var, training, momentum)
    square_root = alpha == 1.0 and power == 0.5
    y = l1 = None
    if fused and square_root:
        fields = (sum_field, sup_field)
        y, l1 = _whole_group_kernel(
            x, *fields, sigma, eps, weight, bias, *stats, return_l1, backend, sync_batch
        )
    if y is not None:
        pass
    elif fused and _is_channel_local(sum_field) and sup_field is None and x.ndim > 2:
        y = local_centring(x, sum_field.window_for(x.ndim - 2), border, backend)  # v = x - m
        l1 = y.abs().mean() if return_l1 else None
        y = affine(y, weight, bias)
    elif fused and sum_field is not None and sup_field is None:  # mean subtraction only
        mean = _batch_statistic(
            x, sum_field, border, None, running_mean, training, momentum, None, True, sync_batch
        )
        y = _centred_affine(x, mean, weight, bias)
        l1 = centred_abs_mean(x, mean) if return_l1 else None
    elif fused and square_root and not (sync_batch and _spans_batch(sum_field, sup_field)):
        y = _torch_norm(x, sum_field, sup_field, sigma, eps, weight, bias, *stats)
        if y is not None and return_l1:
            mean = None
            if sum_field is not None:
                mean = _batch_statistic(
                    x, sum_field, border, None, running_mean, training, momentum, None, False
                )
            l1 = x.abs().mean() if mean is None else centred_abs_mean(x, mean)
    if y is None:
        y, v = _direct_norm(
            x, sum_field, sup_field, sigma, eps, border, *stats, sync_batch, alpha, power
        )
        y = affine(y, weight, bias)
        l1 = v.abs().mean() if return_l1 else None
    for original, used in zip(stats_in, (running_mean, running_var)):
        if original is not None and used is not original:
            with torch.no_grad():
                original.copy_(used)
    return y, l1


def _spans_batch(*fields: Field | None) -> bool:
    return any(field is not None and field.batch for field in fields)


def affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``gamma * y + beta`` with per-channel ``(C,)`` ``weight``/``bias`` (either may be
    ``None``) on ``y`` ``(N, C, *P)``."""
    if weight is None and bias is None:
        return y
    shape = (1, -1) + (1,) * (y.ndim - 2)
    if weight is not None and bias is not None:
        return torch.addcmul(bias.view(shape), y, weight.view(shape))
    if weight is not None:
        return y * weight.view(shape)
    return y + bias.view(shape)


def _whole_groups(field: Field, channels: int) -> int | None:
    """The C++ field kernel's ``groups`` for a field over whole groups of units (0: each
    channel over the batch), or ``None`` for any other field."""
    if field.positions != "all":
        return None
    if field.batch:
        return 0 if field.channels == "self" else None
    groups = {"all": 1, "self": channels, "groups": field.groups}.get(field.channels)
    return groups if groups and channels % groups == 0 else None


def _whole_group_kernel(
    x: Tensor,
    sum_field: Field | None,
    sup_field: Field | None,
    sigma: float | Tensor,
    eps: float | Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    return_l1: bool,
    backend: str,
    sync_batch: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """bn/ln/in/gn-type fields in the C++ kernel of :func:`lit_divnorm.norm.ops.field_norm`
    where torch's own kernels fall short: with an L1 term, mean subtraction only, no
    centring, or a learned sigma. ``(None, None)`` where it does not apply."""
    field = sum_field or sup_field
    plain = not return_l1 and sum_field == sup_field
    plain = plain and not isinstance(sigma, Tensor) and not isinstance(eps, Tensor)
    if field is None or plain or (sum_field and sup_field and sum_field != sup_field):
        return None, None
    groups = _whole_groups(field, x.shape[1])
    if groups is None or not field_kernel_applies(x, backend):
        return None, None
    if field.batch and (
        sync_world_size(sync_batch) > 1 or (not training and running_mean is not None)
    ):
        return None, None  # synchronized statistics, or eval with running statistics
    if field.batch and training:
        _check_batch_size(x)
    centre, scale = sum_field is not None, sup_field is not None
    floor = sigma * sigma + eps
    y, l1, stats = field_norm(x, groups, centre, scale, floor, weight, bias, return_l1)
    if field.batch and training:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            if running_mean is not None and centre:
                running_mean.lerp_(stats[0], momentum)
            if running_var is not None and scale:
                unbias = count / (count - 1) if centre else 1.0
                running_var.lerp_(stats[1] * unbias, momentum)
    return y, (l1 if return_l1 else None)


def _centred_affine(x: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``gamma (x - mean) + beta`` in one pass over ``x``: ``x gamma + (beta - mean gamma)``."""
    if weight is None:
        return affine(x - mean, None, bias)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gamma = weight.view(shape)
    shift = -mean * gamma if bias is None else bias.view(shape) - mean * gamma
    return torch.addcmul(shift, x, gamma)


def _direct_norm(
    x: Tensor,
    sum_field: Field | None,
    sup_field: Field | None,
    sigma: float | Tensor,
    eps: float | Tensor,
    border: Border,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    sync_batch: bool = False,
    alpha: float = 1.0,
    power: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """The framework's equations term by term (the reference the fused paths are tested on):
    ``v = x - mean_A(x)``, ``y = v (sigma^2 + eps + alpha mean_B(v^2))^(-power)``."""
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
        floor = sigma * sigma + eps
        if alpha == 1.0 and power == 0.5:
            y = v * torch.rsqrt(energy + floor)
        else:
            y = v * torch.pow(energy * alpha + floor, -power)
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


def _torch_norm(
    x: Tensor,
    sum_field: Field | None,
    sup_field: Field | None,
    sigma: float | Tensor,
    eps: float | Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
) -> Tensor | None:
    """torch's own kernel where the two fields are one of bn/ln/in/gn (or rmsnorm's: no
    centring, all channels at each position), else ``None``."""
    if isinstance(sigma, Tensor) or isinstance(eps, Tensor):
        return None
    if sum_field is None and sup_field == PRESETS["position"] and bias is None:
        floor = sigma * sigma + eps  # F.rms_norm normalizes the last axis: move C there
        y = F.rms_norm(x.movedim(1, -1), (x.shape[1],), weight, floor)
        return y.movedim(-1, 1)
    if sum_field is None or sup_field != sum_field:
        return None
    if sum_field.positions != "all":
        return None
    floor = sigma * sigma + eps
    if sum_field.batch and sum_field.channels == "self":
        use_batch = training or running_mean is None
        if use_batch:
            _check_batch_size(x)
        return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch, momentum, floor)
    if not sum_field.batch and sum_field.channels in ("all", "self", "groups"):
        groups = {"all": 1, "self": x.shape[1], "groups": sum_field.groups}[sum_field.channels]
        if x.shape[1] % groups:
            return None  # the direct path raises the clear error
        return F.group_norm(x, groups, weight, bias, eps=floor)
    return None


def _is_channel_local(field: Field | None) -> bool:
    return field is not None and field.is_local and not field.batch and field.channels == "all"


def _is_channel_window(field: Field | None) -> bool:
    return (
        field is not None
        and field.channels == "window"
        and field.positions == "self"
        and not field.batch
    )


@functools.lru_cache(maxsize=256)
def local_config(
    sum_field: Field | None, sup_field: Field | None, border: Border, ndim: int
) -> LocalConfig | None:
    """The local DN operators' geometry ``(sum_windows, sup_windows, border, sup_divisors)``
    for an ``ndim``-D input ``(N, C, *P)`` when both fields are positional windows over all
    channels, else ``None`` (cached: a layer asks on every call)."""
    if not (_is_channel_local(sum_field) and _is_channel_local(sup_field)):
        return None
    num = ndim - 2
    divisors = suppression_divisor(sum_field, sup_field, border, num)
    return sum_field.window_for(num), sup_field.window_for(num), border, divisors


def _local_norm(
    x: Tensor,
    sum_field: Field,
    sup_field: Field,
    sigma: float | Tensor,
    eps: float | Tensor,
    border: Border,
    with_l1: bool,
    backend: str,
) -> tuple[Tensor, Tensor | None]:
    features = x.ndim == 2
    if features:  # feature vectors: the C features are one row of positions
        x = x.unsqueeze(1)
    config = local_config.__wrapped__ if torch.compiler.is_compiling() else local_config
    sum_windows, sup_windows, _, divisors = config(sum_field, sup_field, border, x.ndim)
    floor = sigma * sigma + eps
    y, l1 = local_divisive_norm(
        x, sum_windows, sup_windows, floor, border, divisors, with_l1, backend
    )
    return (y.squeeze(1) if features else y), (l1 if with_l1 else None)


def generalized_divisive_norm(
    x: Tensor, beta: Tensor, gamma: Tensor, inverse: bool = False
) -> Tensor:
    """Generalized divisive normalization (Balle et al., ICLR 2016) at every position::

        y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)      (inverse: x_i * sqrt(...))

    The sum runs over the channels at the unit's own position (the ``"position"`` field).

    Shapes: ``x`` ``(N, C, *P)`` (or ``(N, C)``), ``beta`` ``(C,)`` and ``gamma`` ``(C, C)``
    non-negative (``beta > 0`` for the forward transform); output ``x``'s shape and dtype,
    computed in float32 or better.
    """
    check_input(x)
    channels = x.shape[1]
    if tuple(beta.shape) != (channels,) or tuple(gamma.shape) != (channels, channels):
        raise ValueError(
            f"generalized_divisive_norm needs beta of shape ({channels},) and gamma of shape "
            f"({channels}, {channels}) for input {tuple(x.shape)}, got beta "
            f"{tuple(beta.shape)} and gamma {tuple(gamma.shape)}"
        )
    dtype = compute_dtype(x.dtype)
    with full_precision(x.device.type):
        # positions flattened, (N, C, P): one batched matrix product with beta added in it
        # (einsum's permutes to and from channels-last cost more than the product itself)
        batch, positions = x.shape[0], math.prod(x.shape[2:])
        xc = x.to(dtype).reshape(batch, channels, positions)
        weights = gamma.to(dtype).expand(batch, channels, channels)
        energy = torch.baddbmm(beta.to(dtype).view(1, channels, 1), weights, xc * xc)
        y = xc * (energy.sqrt_() if inverse else energy.rsqrt_())
    return y.reshape(x.shape).to(x.dtype)


def check_contrast_settings(window: Window, threshold: float, thresval: float) -> None:
    """:func:`local_contrast_norm`'s settings: odd window sizes, ``threshold, thresval > 0``."""
    for name, value in (("threshold", threshold), ("thresval", thresval)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    widths = normalize_window(window, "window")
    if any(width % 2 == 0 for width in (widths if isinstance(widths, tuple) else (widths,))):
        raise ValueError(
            "local contrast normalization needs an odd window in every dimension (Torch7 "
            f"centres its kernel on the unit), got window={window!r}"
        )


def local_contrast_norm(
    x: Tensor,
    window: Window = 9,
    threshold: float = 1e-4,
    thresval: float = 1e-4,
    mean_floor: bool = False,
) -> Tensor:
    """Local contrast normalization as Torch7's ``nn.SpatialContrastiveNormalization`` with
    its uniform kernel: a local ``window`` over all channels (the ``"local"`` field ``A``)::

        v = x - mean_A(x)                           mean over the window inside the input
        s = sqrt(sum_{k in A, inside} v_k^2 / |A|) / c,     c = |A inside the input| / |A|
        y = v / (s if s > threshold else thresval)

    ``c`` is Torch7's border coefficient: it makes the subtractive mean the mean over the
    members inside the input (our ``"valid"`` averaging); Torch7 divides the local standard
    deviation by the same ``c`` (not by ``sqrt(c)``), so near the border ``s`` is
    ``sqrt(mean_A(v^2) / c)``, larger than the valid standard deviation by ``1 / sqrt(c)``.
    With ``mean_floor`` the divisor is first raised to the mean of ``s`` over the positions of
    each sample, ``max(s, mean s)`` (Jarrett et al., ICCV 2009), which Torch7 does not do.

    Shapes: ``x`` ``(N, C, *P)`` (``(N, C)``: the features read as one row of positions);
    ``window`` an odd int or one odd int per positional dimension; output ``x``'s shape and
    dtype. ``threshold`` and ``thresval`` must be ``> 0``.
    """
    check_input(x)
    if not torch.compiler.is_compiling():  # (symbolic floats under dynamic compile)
        check_contrast_settings(window, threshold, thresval)
    field = Field(channels="all", positions="window", window=window)
    dtype = compute_dtype(x.dtype)
    with full_precision(x.device.type):
        xc = x.to(dtype)
        v = xc - field_mean(xc, field, "valid")
        inside = field_mean(torch.ones_like(xc[:1]), field, "reference")
        energy = field_mean(v * v, field, "reference")
        # below threshold * c the divisor is thresval anyway; the floor keeps sqrt's gradient
        # finite. Whether s > threshold is read off the energy, not off the floored s: that is
        # threshold up to rounding and came out above it at about half the floored positions
        floor = (threshold * inside) ** 2
        above = energy > floor
        std = torch.sqrt(torch.maximum(energy, floor)) / inside
        if mean_floor:  # max(s, m) > threshold where s > threshold or m > threshold
            positions = tuple(range(2, std.ndim)) if x.ndim > 2 else (1,)
            mean = std.mean(dim=positions, keepdim=True)
            std, above = torch.maximum(std, mean), above | (mean > threshold)
        y = v / torch.where(above, std, thresval)
    return y.to(x.dtype)
