"""The norms' operators: ``torch.library`` custom ops, their autograd and the one dispatch.

What runs for my tensor, under ``backend="auto"`` with the C++ kernels built ("C++ op": an
operator of :mod:`.kernels.cpu` whose autograd is C++; "custom op": one of this module's
``torch.library`` operators, one ``register_autograd`` each; CPU float16/bfloat16 inputs run as
float32 on a float32 copy, the output cast back)::

    local DN over all channels (dn, dn*)
      CPU float32/float64    C++ op lit_divnorm_cpu::local_dn (the layer calls it directly)
      CUDA, not float64      Triton kernels in an autograd.Function (eager ones without Triton)
      CUDA float64           the eager kernels in the same autograd.Function
      under torch.compile    custom op lit_divnorm::local_dn, its kernels picked as above
    channel window (lrn)
      everywhere             custom op lit_divnorm::channel_dn, eager and compiled: the C++
                             kernel on the CPU, Triton on CUDA (not float64), else eager
    local centring (dnms)
      CPU float32/float64    the C++ kernel (ctypes) in an autograd.Function
      elsewhere              the eager passes (under torch.compile: plain tensor ops)
    whole-group fields with an L1 term, mean subtraction only, no centring or a learned
    sigma (bn*, ln*, bn-l1, ln-l1, bnms, lnms, frn)
      CPU float32/float64    C++ op lit_divnorm_cpu::field_norm (in training, and in eval
                             without running statistics; eval with them: torch's kernels)
      elsewhere, compiled    torch's batch_norm/group_norm and the L1 term, or term by term
    plain bn, bn-s, ln, ln-s, in, gn (rmsnorm)
      everywhere             torch's batch_norm/group_norm (rms_norm)
    any norm under torch.func (vmap, grad, jacrev, ...)
      everywhere             the eager formulas (no custom op, no C++), which the transform
                             differentiates and batches

Two decisions, both here: :func:`resolve_backend` (the ``backend`` argument against the device:
``"auto"`` resolved, the others checked with a clear error) and :func:`native_takes` (whether
the C++ kernels take this tensor now). ``backend="native"`` forces the C++ kernels (CPU only),
``"triton"`` the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"compile"``
``torch.compile`` of the eager kernels, ``"torch"`` the eager kernels; the fields have no
Triton kernel and run torch's kernels under ``"triton"``.

Two custom ops carry the fields that torch has no kernel for (see :mod:`.kernels` for the
formulas):

- ``lit_divnorm::local_dn``: divisive normalization over all channels and local positional
  windows, ``(N, C, *P)`` maps and ``(N, 1, C)`` feature rows alike; outputs ``(y, stats, l1)``;
- ``lit_divnorm::channel_dn``: the channel-window field (local response normalization),
  ``y = x (floor + alpha B_c(x^2))^(-power)``.

Each has a hand-written backward (its own operator, ``*_backward``), a fake kernel (so
``torch.compile`` traces through them with ``fullgraph=True``) and ``register_autograd``.

Statistics are float32 for every input dtype and autocast state: float16/bfloat16 inputs are
normalized in float32 (autocast off) and the output comes back in the input's dtype; float64
stays float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lit_divnorm.norm.kernels import cpu, eager
from lit_divnorm.norm.kernels import triton as triton_kernels

BACKENDS: tuple[str, ...] = ("auto", "native", "triton", "compile", "torch")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_backend(backend: str) -> str:
    """``backend`` itself, or a ``ValueError`` naming it and the allowed values."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that runs for ``x``: ``"auto"`` resolved, any other checked against ``x``'s
    device (a ``ValueError`` naming the backend, the device and the allowed values)."""
    check_backend(backend)
    device = x.device.type
    if backend == "auto":
        if device == "cpu" and cpu.available():
            return "native"
        if device == "cuda" and x.dtype != torch.float64 and triton_kernels.available():
            return "triton"  # (float64 stays in the eager kernels' float64)
        return "torch"
    if backend == "native":
        if device != "cpu":
            raise ValueError(
                f"backend='native' runs the C++ kernels on CPU tensors, got a tensor on "
                f"{device!r}; of {BACKENDS}, 'auto', 'compile' and 'torch' run there"
            )
        if not cpu.available():
            raise ValueError(
                "backend='native' needs the C++ kernels, which could not be built here (see the "
                "warning above, or LIT_DIVNORM_NATIVE=0 is set); use 'auto' or 'torch'"
            )
    if backend == "triton" and x.dtype == torch.float64:
        raise ValueError(
            "backend='triton' takes float16, bfloat16 and float32 tensors, got float64; "
            "'auto' runs float64 in the eager kernels"
        )
    if backend == "triton" and not triton_kernels.runs_on(x):
        reason = "Triton is not installed" if not triton_kernels.available() else (
            "its kernels run on CUDA tensors (on CPU tensors only under TRITON_INTERPRET=1)"
        )  # fmt: skip
        raise ValueError(
            f"backend='triton' cannot run on a tensor on {device!r}: {reason}; of {BACKENDS}, "
            "'auto', 'compile' and 'torch' run everywhere"
        )
    return backend


def native_takes(x: Tensor) -> bool:
    """Whether the C++ kernels take ``x`` now (the tensor's half of the decision; the
    backend's half is :func:`resolve_backend`): a plain float32/float64 CPU tensor, outside
    ``torch.compile``, ``torch.func`` transforms and CPU autocast."""
    return (
        type(x) is Tensor
        and x.is_cpu
        and x.dtype in cpu.DTYPES
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not transformed()
    )


class NativeLocalDN:
    """A layer's call of the C++ local DN operator ``lit_divnorm_cpu::local_dn`` for a fixed
    geometry and ``floor``: ``call(x)`` gives ``[y]`` or, with ``with_l1``,
    ``[y, l1_weight * mean|x - m|]``, its autograd in C++ (for ``x`` where
    :func:`native_takes`). A plain object, so a layer holding one still pickles and copies."""

    __slots__ = ("floor", "l1_weight", "specs", "with_l1")

    def __init__(self, config: LocalConfig, floor: float, with_l1: bool, l1_weight: float) -> None:
        self.specs = cpu.window_specs(*config)
        self.floor, self.with_l1, self.l1_weight = float(floor), with_l1, float(l1_weight)

    def __call__(self, x: Tensor) -> list[Tensor]:
        return torch.ops.lit_divnorm_cpu.local_dn(
            x, None, self.floor, *self.specs, self.with_l1, self.l1_weight
        )


def native_local_dn(
    config: LocalConfig, floor: float, with_l1: bool, l1_weight: float, backend: str
) -> NativeLocalDN | None:
    """The layer's :class:`NativeLocalDN`, or ``None`` where ``backend`` does not run the C++
    kernels on the CPU (not ``"auto"``/``"native"``, or no compiler). The call skips the
    general path's checks and dispatch, about 10 us of Python per call."""
    if backend not in ("auto", "native") or not cpu.available():
        return None
    return NativeLocalDN(config, floor, with_l1, l1_weight)


def _kernels(name: str):
    """The module whose ``local_*``/``channel_*`` functions run for backend ``name`` (not
    ``"native"``, whose C++ functions take plain numbers)."""
    return triton_kernels if name == "triton" else eager


def transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``jvp``, ...) is
    active. The C++ operators' autograd and the hand-written ``autograd.Function`` classes cannot
    run under one, so every operator then runs its eager torch formula (the ``"torch"``
    kernels' forward) and the transform differentiates and batches that."""
    return torch._C._are_functorch_transforms_active()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device_type`` (so no product or mean inside is cast down)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ---- local DN: (N, C, *P) with local positional windows over all channels ----


LocalConfig = tuple[tuple[int, ...], tuple[int, ...], str, tuple[int, ...] | None]


def _local_config(
    sum_windows: Sequence[int],
    sup_windows: Sequence[int],
    border: str,
    sup_divisors: Sequence[int] | None,
) -> LocalConfig:
    """The kernels' (hashable) geometry arguments."""
    divisors = None if sup_divisors is None else tuple(sup_divisors)
    return tuple(sum_windows), tuple(sup_windows), border, divisors


def _local_forward(
    x: Tensor, floor: float | Tensor, config: LocalConfig, with_l1: bool, name: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(y, stats, l1)`` by the kernel of the resolved backend ``name`` (the one dispatch;
    ``l1`` is ``None`` unless ``with_l1``)."""
    if name == "native":  # C++: no autocast inside, float32/float64 in place
        xc = as_dtype(x, compute_dtype(x.dtype))
        y, stats, l1 = cpu.forward(xc, float(floor), *config, with_l1)
        return as_dtype(y, x.dtype), stats, (l1 if with_l1 else None)
    xc = x if name == "triton" else as_dtype(x, compute_dtype(x.dtype))  # triton loads any
    with full_precision(x.device.type):
        kernel = _kernels(name).local_forward
        if name == "compile":
            kernel = eager.compiled("local_forward")
        if isinstance(floor, Tensor):
            floor = floor.to(compute_dtype(x.dtype))
        y, stats, l1 = kernel(xc, floor, *config, with_l1)
    return as_dtype(y, x.dtype), stats, (l1 if with_l1 else None)


def _local_backward(
    grad_y: Tensor,
    grad_l1: Tensor | None,
    x: Tensor,
    stats: Tensor,
    config: LocalConfig,
    name: str,
) -> tuple[Tensor, Tensor | float]:
    """``(dL/dx, dL/dfloor)`` from ``dL/dy`` and ``dL/dl1`` (``None``: no L1 term) by the
    kernel of the resolved backend ``name``."""
    dtype = stats.dtype
    coef = 0.0 if grad_l1 is None else float(grad_l1) / max(x.numel(), 1)
    if name == "native":
        # an L1 term left out of the loss (coef 0): the kernel skips its sign passes
        gc, xc = as_dtype(grad_y, dtype), as_dtype(x, dtype)
        grad_x, grad_floor = cpu.backward(gc, xc, stats, *config, coef or None)
        return as_dtype(grad_x, x.dtype), grad_floor
    xc, gc = (x, grad_y) if name == "triton" else (x.to(dtype), grad_y.to(dtype))
    with full_precision(x.device.type):
        kernel = _kernels(name).local_backward
        if name == "compile":
            kernel = eager.compiled("local_backward")
        l1_grad = grad_l1.to(dtype) if coef else None
        grad_x, grad_floor = kernel(gc, l1_grad, xc, stats, *config)
    return grad_x.to(x.dtype), grad_floor


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (``t`` itself when it is already: no dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


class _LocalDivisiveNorm(torch.autograd.Function):
    """Eager calls of ``lit_divnorm::local_dn``'s kernels and hand-written backward: ``y``, or
    ``(y, l1)`` with ``with_l1``, for the resolved backend ``name`` (``"native"`` calls take
    the C++ operator :func:`lit_divnorm.norm.kernels.cpu.local_dn` instead)."""

    @staticmethod
    def forward(ctx, x, floor, config, with_l1, name):  # type: ignore[override]
        y, stats, l1 = _local_forward(x, floor, config, with_l1, name)
        ctx.save_for_backward(x, stats)
        ctx.args = (config, name, floor)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return (y, l1) if with_l1 else y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_l1=None):  # type: ignore[override]
        x, stats = ctx.saved_tensors
        config, name, floor = ctx.args
        if grad_y is None:  # only the L1 term reached the loss
            grad_y = torch.zeros_like(x)
        grad_x, grad_floor = _local_backward(grad_y, grad_l1, x, stats, config, name)
        return grad_x, _floor_grad(ctx, grad_floor, floor), None, None, None


def _floor_grad(ctx, grad_floor: Tensor | float, floor: float | Tensor) -> Tensor | None:
    """``dL/dfloor`` shaped as a learned floor, or ``None`` for a fixed one."""
    if not ctx.needs_input_grad[1]:
        return None
    return torch.as_tensor(grad_floor, dtype=floor.dtype, device=floor.device)


@torch.library.custom_op("lit_divnorm::local_dn", mutates_args=())
def local_dn(
    x: Tensor,
    floor: Tensor,
    sum_windows: list[int],
    sup_windows: list[int],
    sup_divisors: list[int] | None,
    border: str,
    with_l1: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, stats, l1)``: ``y`` in ``x``'s dtype, ``stats`` ``(3, N, 1, *P)`` (``q1, m, r``)
    and ``l1 = mean|x - m|`` (``0.`` unless ``with_l1``) in the statistics' dtype."""
    config = _local_config(sum_windows, sup_windows, border, sup_divisors)
    y, stats, l1 = _local_forward(x, floor, config, with_l1, resolve_backend(backend, x))
    return y, stats, (x.new_zeros((), dtype=stats.dtype) if l1 is None else l1)


@local_dn.register_fake
def _(x, floor, sum_windows, sup_windows, sup_divisors, border, with_l1, backend):
    dtype = compute_dtype(x.dtype)
    stats = x.new_empty((3, x.shape[0], 1, *x.shape[2:]), dtype=dtype)
    return torch.empty_like(x), stats, x.new_empty((), dtype=dtype)


@torch.library.custom_op("lit_divnorm::local_dn_backward", mutates_args=())
def local_dn_backward(
    grad_y: Tensor,
    grad_l1: Tensor,
    x: Tensor,
    stats: Tensor,
    sum_windows: list[int],
    sup_windows: list[int],
    sup_divisors: list[int] | None,
    border: str,
    with_l1: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dfloor)`` of :func:`local_dn` (``dL/dx`` in ``x``'s dtype)."""
    config = _local_config(sum_windows, sup_windows, border, sup_divisors)
    grad_l1 = grad_l1 if with_l1 else None
    name = resolve_backend(backend, x)
    grad_x, grad_floor = _local_backward(grad_y, grad_l1, x, stats, config, name)
    return grad_x, torch.as_tensor(grad_floor, dtype=stats.dtype, device=stats.device)


@local_dn_backward.register_fake
def _(grad_y, grad_l1, x, stats, sum_windows, sup_windows, sup_divisors, border, with_l1, backend):
    return torch.empty_like(x), stats.new_empty(())


def _local_setup(ctx, inputs, output) -> None:
    x, floor, sum_windows, sup_windows, sup_divisors, border, with_l1, backend = inputs
    ctx.save_for_backward(x, output[1])
    ctx.config = (sum_windows, sup_windows, sup_divisors, border, with_l1, backend)
    ctx.floor_dtype = floor.dtype


def _local_op_backward(ctx, grad_y, grad_stats, grad_l1):
    x, stats = ctx.saved_tensors
    grad_x, grad_floor = local_dn_backward(grad_y, grad_l1, x, stats, *ctx.config)
    grad_floor = grad_floor.to(ctx.floor_dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_floor, None, None, None, None, None, None


local_dn.register_autograd(_local_op_backward, setup_context=_local_setup)


def local_divisive_norm(
    x: Tensor,
    sum_windows: tuple[int, ...],
    sup_windows: tuple[int, ...],
    floor: float | Tensor,
    border: str = "valid",
    sup_divisors: tuple[int, ...] | None = None,
    with_l1: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(y, mean|x - m|)`` for ``x`` ``(N, C, *P)`` (the second output is ``None`` unless
    ``with_l1``); ``floor = sigma^2 + eps`` (a tensor when learned). Under ``torch.compile``
    this is the operator ``lit_divnorm::local_dn``. Eager calls run the same kernels without
    custom_op's Python dispatch (about 100 us per forward+backward, half a small layer's
    time): on the CPU the C++ operator ``lit_divnorm_cpu::local_dn``, whose autograd is C++
    as well, elsewhere an ``autograd.Function``."""
    if torch.compiler.is_compiling():
        if not isinstance(floor, Tensor):
            floor = torch.tensor(float(floor), dtype=torch.float64)
        divisors = None if sup_divisors is None else list(sup_divisors)
        y, _, l1 = local_dn(
            x, floor, list(sum_windows), list(sup_windows), divisors, border, with_l1, backend
        )
        return y, (l1 if with_l1 else None)
    config = _local_config(sum_windows, sup_windows, border, sup_divisors)
    if transformed():  # torch.func: the eager formula, differentiated by the transform
        check_backend(backend)
        y, _, l1 = _local_forward(x, floor, config, with_l1, "torch")
        return y, l1
    name = resolve_backend(backend, x)
    if name == "native":  # the C++ operator, its autograd in C++ too
        outputs = cpu.local_dn(as_dtype(x, compute_dtype(x.dtype)), floor, *config, with_l1)
        y = as_dtype(outputs[0], x.dtype)
        return y, (outputs[1] if with_l1 else None)
    if with_l1:
        return _LocalDivisiveNorm.apply(x, floor, config, True, name)
    return _LocalDivisiveNorm.apply(x, floor, config, False, name), None


# ---- fields over whole groups of units (batch, layer, instance, group) in one C++ kernel ----


def field_kernel_applies(x: Tensor, backend: str) -> bool:
    """Whether :func:`field_norm` runs for ``x``: float32/float64 on the CPU with the C++
    kernels (backend ``auto`` or ``native``), outside ``torch.compile`` and ``torch.func``
    transforms."""
    return backend in ("auto", "native") and native_takes(x) and cpu.available()


def field_norm(
    x: Tensor,
    groups: int,
    centre: bool,
    scale: bool,
    floor: float | Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    with_l1: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean|x - mu|, stats)`` for a field over whole groups of units of ``x``
    ``(N, C, *P)``: each channel over the batch (``groups=0``) or ``groups`` groups of channels
    per sample (see :func:`lit_divnorm.norm.kernels.cpu.field_forward`; ``stats`` ``(3, G)``
    holds ``mu, var, r``). Two passes over ``x`` each way, the L1 term inside them; the
    operator and its autograd are C++."""
    return cpu.field_norm(x, floor, weight, bias, groups, centre, scale, with_l1)


# ---- local mean subtraction only (dnms): y = x - A(mean_c x) ----


class _LocalCentring(torch.autograd.Function):
    """``x - A(mean_c x)`` with its hand-written backward (autograd's own would make five
    passes over the gradient): the C++ kernel (``native``) or the eager passes."""

    @staticmethod
    def forward(ctx, x, sum_windows, border, native):  # type: ignore[override]
        ctx.args = (sum_windows, border, native)
        if native:
            return cpu.centre(x, sum_windows, border)
        return eager.local_centre_forward(x, sum_windows, border)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        sum_windows, border, native = ctx.args
        if native:
            return cpu.centre(grad_y, sum_windows, border, adjoint=True), None, None, None
        return eager.local_centre_backward(grad_y, sum_windows, border), None, None, None


def local_centring(
    x: Tensor, sum_windows: tuple[int, ...], border: str = "valid", backend: str = "auto"
) -> Tensor:
    """``x - A(mean_c x)`` for ``x`` ``(N, C, *P)``, any device: the C++ kernel for float32 and
    float64 CPU tensors under ``backend`` ``"auto"``/``"native"``, else the eager passes
    (traced as plain tensor operations under ``torch.compile``)."""
    if torch.compiler.is_compiling() or transformed():
        return eager.local_centre_forward(x, sum_windows, border)
    native = native_takes(x) and resolve_backend(backend, x) == "native"
    return _LocalCentring.apply(x, tuple(sum_windows), border, native)


# ---- the L1 term of a centred activation: mean |x - mean| ----


class CentredAbsMean(torch.autograd.Function):
    """``mean |x - mean|`` for ``mean`` broadcasting to ``x``, saving only ``x`` and ``mean``
    (which the norm saves anyway) instead of the full-size ``x - mean``::

        dL/dx = g sign(x - mean) / numel,   dL/dmean = -sum (over the broadcast) of dL/dx
    """

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, mean)
        return torch.sub(x, mean).abs_().mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        grad_x = torch.sub(x, mean).sign_().mul_(grad / x.numel())
        return grad_x, -grad_x.sum_to_size(mean.shape)


def centred_abs_mean(x: Tensor, mean: Tensor) -> Tensor:
    """``mean |x - mean|`` (the L1 sparsity term) with ``x``-sized memory for backward
    (under ``torch.func`` transforms: plain tensor operations)."""
    if transformed():
        return torch.sub(x, mean).abs().mean()
    return CentredAbsMean.apply(x, mean)


# ---- the channel-window field: y = x (floor + alpha B_c(x^2))^(-power) ----


def _channel_window(width: int, border: str, divisor: int) -> tuple[int, int, int]:
    """``(before, after, divisor)`` for the C++ kernel (divisor 0: the channels inside)."""
    return ((width - 1) // 2, width // 2, divisor if border == "reference" else 0)


ChannelConfig = tuple[int, str, int, float, float]  # width, border, divisor, alpha, power


def _channel_forward(
    x: Tensor, floor: float | Tensor, config: ChannelConfig, backend: str
) -> Tensor:
    """``y`` by the kernel ``backend`` picks for ``x`` (the one dispatch)."""
    width, border, divisor, alpha, power = config
    name = resolve_backend(backend, x)
    xc = x if name == "triton" else x.to(compute_dtype(x.dtype))
    with full_precision(x.device.type):
        if name == "native":
            window = _channel_window(width, border, divisor)
            y = cpu.channel_forward(xc, window, float(floor), alpha, power)
        else:
            kernel = _kernels(name).channel_forward
            if name == "compile":
                kernel = eager.compiled("channel_forward")
            if isinstance(floor, Tensor):
                floor = floor.to(compute_dtype(x.dtype))
            y = kernel(xc, floor, *config)
    return y.to(x.dtype)


def _channel_backward(
    grad_y: Tensor, x: Tensor, floor: float | Tensor, config: ChannelConfig, backend: str
) -> tuple[Tensor, Tensor | float]:
    """``(dL/dx, dL/dfloor)`` of :func:`_channel_forward`."""
    width, border, divisor, alpha, power = config
    name = resolve_backend(backend, x)
    dtype = compute_dtype(x.dtype)
    xc, gc = (x, grad_y) if name == "triton" else (x.to(dtype), grad_y.to(dtype))
    with full_precision(x.device.type):
        if name == "native":
            window = _channel_window(width, border, divisor)
            grad_x, grad_floor = cpu.channel_backward(gc, xc, window, float(floor), alpha, power)
        else:
            kernel = _kernels(name).channel_backward
            if name == "compile":
                kernel = eager.compiled("channel_backward")
            if isinstance(floor, Tensor):
                floor = floor.to(dtype)
            grad_x, grad_floor = kernel(gc, xc, floor, *config)
    return grad_x.to(x.dtype), grad_floor


@torch.library.custom_op("lit_divnorm::channel_dn", mutates_args=())
def channel_dn(
    x: Tensor,
    floor: Tensor,
    width: int,
    border: str,
    divisor: int,
    alpha: float,
    power: float,
    backend: str,
) -> Tensor:
    """``x (floor + alpha B_c(x^2))^(-power)`` in ``x``'s dtype; ``B_c`` averages over
    ``width`` channels, by the channels inside (``"valid"``) or ``divisor``
    (``"reference"``)."""
    return _channel_forward(x, floor, (width, border, divisor, alpha, power), backend)


@channel_dn.register_fake
def _(x, floor, width, border, divisor, alpha, power, backend):
    return torch.empty_like(x)


@torch.library.custom_op("lit_divnorm::channel_dn_backward", mutates_args=())
def channel_dn_backward(
    grad_y: Tensor,
    x: Tensor,
    floor: Tensor,
    width: int,
    border: str,
    divisor: int,
    alpha: float,
    power: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dfloor)`` of :func:`channel_dn`."""
    config = (width, border, divisor, alpha, power)
    grad_x, grad_floor = _channel_backward(grad_y, x, floor, config, backend)
    return grad_x, torch.as_tensor(grad_floor, dtype=compute_dtype(x.dtype), device=x.device)


@channel_dn_backward.register_fake
def _(grad_y, x, floor, width, border, divisor, alpha, power, backend):
    return torch.empty_like(x), x.new_empty((), dtype=compute_dtype(x.dtype))


def _channel_setup(ctx, inputs, output) -> None:
    x, floor, *config = inputs
    ctx.save_for_backward(x, floor)
    ctx.config = config


def _channel_op_backward(ctx, grad_y):
    x, floor = ctx.saved_tensors
    grad_x, grad_floor = channel_dn_backward(grad_y, x, floor, *ctx.config)
    grad_floor = grad_floor.to(floor.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_floor, None, None, None, None, None, None


channel_dn.register_autograd(_channel_op_backward, setup_context=_channel_setup)


def channel_divisive_norm(
    x: Tensor,
    width: int,
    floor: float | Tensor,
    border: str = "valid",
    divisor: int | None = None,
    alpha: float = 1.0,
    power: float = 0.5,
    backend: str = "auto",
) -> Tensor:
    """``x (floor + alpha B_c(x^2))^(-power)`` for ``x`` ``(N, C, *P)`` (``(N, C)``: one
    position each); ``divisor`` replaces ``width`` in ``"reference"``'s divisor. Eager and
    compiled calls alike are the operator ``lit_divnorm::channel_dn`` (its backward the
    operator ``lit_divnorm::channel_dn_backward``); under ``torch.func`` transforms the eager
    formula, which the transform differentiates."""
    if not torch.compiler.is_compiling() and not (math.isfinite(alpha) and math.isfinite(power)):
        # (under dynamic compile alpha and power may be symbolic floats: no Python check)
        raise ValueError(f"alpha and power must be finite, got alpha={alpha}, power={power}")
    maps = x.unsqueeze(-1) if x.ndim == 2 else x  # (N, C) features: one position each
    config = (width, border, divisor or width, float(alpha), float(power))
    if transformed() and not torch.compiler.is_compiling():
        check_backend(backend)  # torch.func: the eager formula, differentiated by the transform
        y = _channel_forward(maps, floor, config, "torch")
    else:  # eager and compiled alike: the one operator, its one autograd
        if not isinstance(floor, Tensor):
            floor = torch.tensor(float(floor), dtype=torch.float64)
        y = channel_dn(maps, floor, *config, backend)
    return y.squeeze(-1) if x.ndim == 2 else y


# ---- the fused LSTM's C++ pieces (models/fused_rnn.py goes through here, not kernels/) ----

native_applies = cpu.applies  # a float32/float64 CPU tensor, the library built
box_rows = cpu.box_rows  # box means along the last axis (and their transpose)
lstm_forward_steps = cpu.lstm_forward_steps  # the C++ time steps of FusedLSTM
lstm_backward_steps = cpu.lstm_backward_steps
