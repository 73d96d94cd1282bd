"""The kernels in Triton, for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

The same two functions per field as :mod:`.eager`, with the same formulas (see its
docstring), for float32, float16 and bfloat16 inputs (statistics accumulated in float32, box
sums in float64):

- local DN over ``(N, C, *P)``: one pass over ``x`` for the channel moments at each position
  (about channel 0's value, so a large mean does not cancel them), box means of the
  ``(N, *P)`` statistic planes by prefix sums along each axis (the cost does not depend on the
  window), and one pass that normalizes and sums ``|x - m|`` for the L1 term. The backward
  makes the same two passes over ``x`` and ``dL/dy``.
- the channel-window field: one pass that slides a window sum of ``x^2`` along the channels
  at each position; the backward slides twice.

:func:`available` says whether Triton imports; nothing here needs a driver at import time (no
autotuning), so the kernels run in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None

BLOCK = 256  # positions per program in the passes over x
MAX_LINE = 1 << 16  # the longest axis the box kernel takes in one block


def available() -> bool:
    """Whether Triton imports (its kernels then run on CUDA tensors)."""
    return triton is not None


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as the kernels were decorated


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter, on CPU tensors: ``TRITON_INTERPRET=1``
    was set before this module was imported."""
    return _INTERPRETED


def runs_on(x: Tensor) -> bool:
    """Whether these kernels can run on ``x``'s device."""
    return available() and (x.is_cuda or (interpreted() and x.is_cpu))


if triton is not None:

    @triton.jit
    def _sign(v):
        return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))

    @triton.jit
    def _channel_moments_kernel(x, q1, var, channels, positions, BLOCK: tl.constexpr):
        """q1 = mean_c x and var = mean_c (x - q1)^2 per position, about channel 0's value."""
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < positions
        base = x + n * channels * positions
        x0 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.zeros([BLOCK], dtype=tl.float32)
        b = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, channels):
            d = tl.load(base + c * positions + offs, mask=mask, other=0.0).to(tl.float32) - x0
            a += d
            b += d * d
        mean = a / channels
        tl.store(q1 + n * positions + offs, x0 + mean, mask=mask)
        tl.store(var + n * positions + offs, tl.maximum(b / channels - mean * mean, 0.0), mask=mask)

    @triton.jit
    def _box_lines_kernel(
        src,
        dst,
        scratch,
        length,
        inner,
        lead,
        lag,
        divisor,
        before,
        after,
        ADJOINT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Box means along the middle axis of a plane viewed as (outer, length, inner), one
        line per program, by a float64 prefix sum: out_j = s_j (S[j + lag + 1] - S[j - lead])
        (the adjoint pre-scales by s_j and swaps the window's sides). s_j is 1 / divisor, or
        1 / (positions of the forward window at j inside the axis) when divisor is 0."""
        line = tl.program_id(0).to(tl.int64)
        outer_index = line // inner
        base = outer_index * length * inner + line % inner
        j = tl.arange(0, BLOCK)
        mask = j < length
        values = tl.load(src + base + j * inner, mask=mask, other=0.0).to(tl.float64)
        inside = tl.minimum(j + after, length - 1) - tl.maximum(j - before, 0) + 1
        count = tl.maximum(tl.where(divisor > 0, divisor, inside), 1).to(tl.float64)
        if ADJOINT:
            values = values / count
        prefix = tl.cumsum(values, axis=0)
        row = scratch + line * (BLOCK + 1)
        tl.store(row + 1 + j, prefix, mask=mask)
        tl.store(row + j, tl.zeros([BLOCK], dtype=tl.float64), mask=j == 0)
        tl.debug_barrier()
        high = tl.minimum(j + lag + 1, length)
        low = tl.maximum(j - lead, 0)
        total = tl.load(row + high, mask=mask, other=0.0) - tl.load(row + low, mask=mask, other=0.0)
        if not ADJOINT:
            total = total / count
        tl.store(dst + base + j * inner, total.to(tl.float32), mask=mask)

    @triton.jit
    def _normalize_kernel(
        x, y, m, r, partial, channels, positions, WITH_L1: tl.constexpr, BLOCK: tl.constexpr
    ):
        """y = (x - m) r; partial[program] = sum |x - m| over the program's values."""
        n = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < positions
        mean = tl.load(m + n * positions + offs, mask=mask, other=0.0)
        scale = tl.load(r + n * positions + offs, mask=mask, other=0.0)
        base = n * channels * positions
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, channels):
            xv = tl.load(x + base + c * positions + offs, mask=mask, other=0.0).to(tl.float32)
            v = xv - mean
            tl.store(y + base + c * positions + offs, v * scale, mask=mask)
            if WITH_L1:
                acc += tl.where(mask, tl.abs(v), 0.0)
        if WITH_L1:
            tl.store(partial + n * tl.num_programs(1) + block, tl.sum(acc, axis=0))

    @triton.jit
    def _grad_moments_kernel(
        g, x, m, sums, channels, positions, WITH_L1: tl.constexpr, BLOCK: tl.constexpr
    ):
        """sums[0] = sum_c g, sums[1] = sum_c g (x - x_0), sums[2] = sum_c sign(x - m)."""
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < positions
        base = n * channels * positions
        plane = n * positions + offs
        count = tl.num_programs(0).to(tl.int64) * positions  # N * P: one statistic plane
        x0 = tl.load(x + base + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(m + plane, mask=mask, other=0.0)
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        sum_gx = tl.zeros([BLOCK], dtype=tl.float32)
        sum_sign = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, channels):
            gv = tl.load(g + base + c * positions + offs, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(x + base + c * positions + offs, mask=mask, other=0.0).to(tl.float32)
            sum_g += gv
            sum_gx += gv * (xv - x0)
            if WITH_L1:
                sum_sign += _sign(xv - mean)
        tl.store(sums + plane, sum_g, mask=mask)
        tl.store(sums + count + plane, sum_gx, mask=mask)
        if WITH_L1:
            tl.store(sums + 2 * count + plane, sum_sign, mask=mask)

    @triton.jit
    def _grad_input_kernel(
        g,
        x,
        m,
        r,
        k,
        shift,
        grad_x,
        coef,
        channels,
        positions,
        WITH_L1: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """dL/dx = g r + k (x - m) + shift (+ coef sign(x - m))."""
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < positions
        plane = n * positions + offs
        mean = tl.load(m + plane, mask=mask, other=0.0)
        scale = tl.load(r + plane, mask=mask, other=0.0)
        kv = tl.load(k + plane, mask=mask, other=0.0)
        sv = tl.load(shift + plane, mask=mask, other=0.0)
        base = n * channels * positions
        for c in range(0, channels):
            gv = tl.load(g + base + c * positions + offs, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(x + base + c * positions + offs, mask=mask, other=0.0).to(tl.float32)
            v = xv - mean
            out = gv * scale + kv * v + sv
            if WITH_L1:
                out += coef * _sign(v)
            tl.store(grad_x + base + c * positions + offs, out, mask=mask)

    @triton.jit
    def _channel_forward_kernel(
        x,
        y,
        channels,
        positions,
        before,
        after,
        divisor,
        floor,
        alpha,
        power,
        SQRT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """y_c = x_c d_c^(-power), d_c = floor + alpha B_c(x^2): a window sum of x^2 slides
        along the channels (float64)."""
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < positions
        base = x + n * channels * positions
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, tl.minimum(after, channels - 1) + 1):
            xv = tl.load(base + i * positions + offs, mask=mask, other=0.0).to(tl.float64)
            acc += xv * xv
        for c in range(0, channels):
            inside = tl.minimum(c + after, channels - 1) - tl.maximum(c - before, 0) + 1
            count = tl.where(divisor > 0, divisor, inside).to(tl.float64)
            d = (floor + alpha * acc / count).to(tl.float32)
            if SQRT:
                factor = tl.rsqrt(d)
            else:
                factor = tl.exp(-power * tl.log(d))
            xv = tl.load(base + c * positions + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y + n * channels * positions + c * positions + offs, xv * factor, mask=mask)
            entering = c + 1 + after
            add = tl.load(
                base + entering * positions + offs, mask=mask & (entering < channels), other=0.0
            ).to(tl.float64)
            leaving = c - before
            drop = tl.load(
                base + leaving * positions + offs, mask=mask & (leaving >= 0), other=0.0
            ).to(tl.float64)
            acc += add * add - drop * drop

    @triton.jit
    def _channel_backward_kernel(
        g,
        x,
        inner,
        grad_x,
        partial,
        channels,
        positions,
        before,
        after,
        divisor,
        floor,
        alpha,
        power,
        SQRT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """First pass: grad_x = g d^(-power) and inner_c = -power g x d^(-power - 1) / n_c
        (n_c: the window's divisor); partial[program] = sum of -power g x d^(-power - 1)."""
        n = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < positions
        start = n * channels * positions
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, tl.minimum(after, channels - 1) + 1):
            xv = tl.load(x + start + i * positions + offs, mask=mask, other=0.0).to(tl.float64)
            acc += xv * xv
        floor_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, channels):
            inside = tl.minimum(c + after, channels - 1) - tl.maximum(c - before, 0) + 1
            count = tl.where(divisor > 0, divisor, inside).to(tl.float32)
            d = (floor + alpha * acc / count.to(tl.float64)).to(tl.float32)
            if SQRT:
                factor = tl.rsqrt(d)
            else:
                factor = tl.exp(-power * tl.log(d))
            at = start + c * positions + offs
            xv = tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
            gv = tl.load(g + at, mask=mask, other=0.0).to(tl.float32)
            term = -power * gv * xv * factor / d
            floor_sum += tl.where(mask, term, 0.0)
            tl.store(inner + at, term / count, mask=mask)
            tl.store(grad_x + at, gv * factor, mask=mask)
            entering = c + 1 + after
            add = tl.load(
                x + start + entering * positions + offs,
                mask=mask & (entering < channels),
                other=0.0,
            ).to(tl.float64)
            leaving = c - before
            drop = tl.load(
                x + start + leaving * positions + offs, mask=mask & (leaving >= 0), other=0.0
            ).to(tl.float64)
            acc += add * add - drop * drop
        tl.store(partial + n * tl.num_programs(1) + block, tl.sum(floor_sum, axis=0))

    @triton.jit
    def _channel_adjoint_kernel(
        x, inner, grad_x, out, channels, positions, before, after, alpha, BLOCK: tl.constexpr
    ):
        """Second pass: out_c = grad_x_c + 2 alpha x_c sum_{j in c - after .. c + before}
        inner_j (the transpose of the window sum, slid along the channels)."""
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < positions
        start = n * channels * positions
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, tl.minimum(before, channels - 1) + 1):
            acc += tl.load(inner + start + i * positions + offs, mask=mask, other=0.0).to(
                tl.float64
            )
        for c in range(0, channels):
            at = start + c * positions + offs
            xv = tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
            partial_grad = tl.load(grad_x + at, mask=mask, other=0.0)
            total = partial_grad + 2.0 * alpha * acc.to(tl.float32) * xv
            tl.store(out + at, total, mask=mask)
            entering = c + 1 + before
            acc += tl.load(
                inner + start + entering * positions + offs,
                mask=mask & (entering < channels),
                other=0.0,
            ).to(tl.float64)
            leaving = c - after
            acc -= tl.load(
                inner + start + leaving * positions + offs, mask=mask & (leaving >= 0), other=0.0
            ).to(tl.float64)


def _grid(x: Tensor) -> tuple[int, int]:
    return x.shape[0], triton.cdiv(max(math.prod(x.shape[2:]), 1), BLOCK)


def _box_planes(
    plane: Tensor,
    windows: Sequence[int],
    border: str,
    divisors: Sequence[int] | None,
    adjoint: bool = False,
) -> Tensor:
    """Box means (or their transpose) of a float32 ``(N, *P)`` plane along each axis of
    ``P``, one Triton launch per axis; ``divisors`` replace the windows in ``"reference"``."""
    divisors = windows if divisors is None else divisors
    out = plane.contiguous()
    dims = out.shape[1:]
    for axis, (width, divisor) in enumerate(zip(windows, divisors, strict=True)):
        length = dims[axis]
        if length > MAX_LINE:
            raise ValueError(f"the Triton box kernel takes axes up to {MAX_LINE}, got {length}")
        inner = math.prod(dims[axis + 1 :])
        lines = out.numel() // length
        block = triton.next_power_of_2(max(length, 2))
        scratch = torch.empty(lines * (block + 1), dtype=torch.float64, device=out.device)
        before, after = (width - 1) // 2, width // 2
        lead, lag = (after, before) if adjoint else (before, after)
        result = torch.empty_like(out)
        _box_lines_kernel[(lines,)](
            out,
            result,
            scratch,
            length,
            inner,
            lead,
            lag,
            divisor if border == "reference" else 0,
            before,
            after,
            ADJOINT=adjoint,
            BLOCK=block,
        )
        out = result
    return out


def local_forward(
    x: Tensor,
    floor: Tensor | float,
    sum_windows: Sequence[int],
    sup_windows: Sequence[int],
    border: str,
    sup_divisors: Sequence[int] | None,
    with_l1: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, stats, l1)`` as :func:`lit_divnorm.norm.kernels.eager.local_forward` (``y`` in
    ``x``'s dtype; ``stats`` ``(3, N, 1, *P)`` and ``l1`` in float32)."""
    x = x.contiguous()
    n, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    planes = x.new_empty((3, n, *x.shape[2:]), dtype=torch.float32)
    q1, var = planes[0], torch.empty_like(planes[0])
    grid = _grid(x)
    _channel_moments_kernel[grid](x, q1, var, channels, positions, BLOCK=BLOCK)
    m = _box_planes(q1, sum_windows, border, None)
    spread = _box_planes(var + (q1 - m).square(), sup_windows, border, sup_divisors)
    planes[1] = m
    planes[2] = torch.rsqrt(spread + floor)
    y = torch.empty_like(x)
    partial = torch.zeros(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    _normalize_kernel[grid](
        x, y, planes[1], planes[2], partial, channels, positions, WITH_L1=with_l1, BLOCK=BLOCK
    )
    l1 = partial.sum() / max(x.numel(), 1)
    return y, planes.unsqueeze(2), l1


def local_backward(
    grad_y: Tensor,
    grad_l1: Tensor | None,
    x: Tensor,
    stats: Tensor,
    sum_windows: Sequence[int],
    sup_windows: Sequence[int],
    border: str,
    sup_divisors: Sequence[int] | None,
) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dfloor)`` as :func:`lit_divnorm.norm.kernels.eager.local_backward`."""
    x, grad_y = x.contiguous(), grad_y.contiguous()
    n, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    q1, m, r = (plane.squeeze(1).contiguous() for plane in stats.float().unbind(0))
    with_l1 = grad_l1 is not None
    sums = x.new_empty((3, n, *x.shape[2:]), dtype=torch.float32)
    grid = _grid(x)
    _grad_moments_kernel[grid](
        grad_y, x, m, sums, channels, positions, WITH_L1=with_l1, BLOCK=BLOCK
    )
    x0 = x[:, 0].float()
    mean_g = sums[0] / channels
    grad_e = (sums[1] / channels + (x0 - m) * mean_g) * (-0.5 * channels * r * r * r)
    grad_floor = grad_e.sum()
    k = _box_planes(grad_e, sup_windows, border, sup_divisors, adjoint=True) * (2.0 / channels)
    grad_m = -channels * (r * mean_g + k * (q1 - m))
    coef = 0.0
    if with_l1:
        coef = float(grad_l1) / max(x.numel(), 1)
        grad_m = grad_m - coef * sums[2]
    shift = _box_planes(grad_m, sum_windows, border, None, adjoint=True) / channels
    grad_x = torch.empty_like(x)
    _grad_input_kernel[grid](
        grad_y,
        x,
        m,
        r,
        k.contiguous(),
        shift.contiguous(),
        grad_x,
        coef,
        channels,
        positions,
        WITH_L1=with_l1,
        BLOCK=BLOCK,
    )
    return grad_x, grad_floor


def _channel_args(width: int, border: str, divisor: int | None) -> tuple[int, int, int]:
    return (width - 1) // 2, width // 2, (divisor or width) if border == "reference" else 0


def channel_forward(
    x: Tensor,
    floor: Tensor | float,
    width: int,
    border: str,
    divisor: int | None,
    alpha: float,
    power: float,
) -> Tensor:
    """``y = x (floor + alpha B_c(x^2))^(-power)`` as :func:`.eager.channel_forward`."""
    x = x.contiguous()
    y = torch.empty_like(x)
    before, after, count = _channel_args(width, border, divisor)
    _channel_forward_kernel[_grid(x)](
        x,
        y,
        x.shape[1],
        math.prod(x.shape[2:]),
        before,
        after,
        count,
        float(floor),
        float(alpha),
        float(power),
        SQRT=power == 0.5,
        BLOCK=BLOCK,
    )
    return y


def channel_backward(
    grad_y: Tensor,
    x: Tensor,
    floor: Tensor | float,
    width: int,
    border: str,
    divisor: int | None,
    alpha: float,
    power: float,
) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dfloor)`` as :func:`.eager.channel_backward`."""
    x, grad_y = x.contiguous(), grad_y.contiguous()
    before, after, count = _channel_args(width, border, divisor)
    channels, positions = x.shape[1], math.prod(x.shape[2:])
    grid = _grid(x)
    inner = torch.empty_like(x, dtype=torch.float32)
    partial_grad = torch.empty_like(x, dtype=torch.float32)
    partial = torch.zeros(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    _channel_backward_kernel[grid](
        grad_y,
        x,
        inner,
        partial_grad,
        partial,
        channels,
        positions,
        before,
        after,
        count,
        float(floor),
        float(alpha),
        float(power),
        SQRT=power == 0.5,
        BLOCK=BLOCK,
    )
    grad_x = torch.empty_like(x)
    _channel_adjoint_kernel[grid](
        x, inner, partial_grad, grad_x, channels, positions, before, after, float(alpha),
        BLOCK=BLOCK,
    )  # fmt: skip
    return grad_x, partial.sum()
