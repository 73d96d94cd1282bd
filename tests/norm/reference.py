"""Direct, loop-based evaluation of the paper's equations, independent of the library's code.

For every unit ``u`` of ``x`` (shape ``(N, C, *positions)``) the loops enumerate the members of
its field one by one::

    v_u = x_u - (1 / |A_u|) sum_{i in A_u} x_i
    y_u = v_u / sqrt(sigma^2 + eps + (1 / |B_u|) sum_{k in B_u} v_k^2)

With ``border="valid"`` members outside the tensor are dropped and ``|A_u|`` counts the rest;
with ``"reference"`` they count as zeros and the divisor is the full window (for the
suppression field, the summation window's area, as in the authors' code).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass
class RefField:
    batch: bool = False
    channels: str = "self"  # self | all | window | groups
    positions: str = "self"  # self | all | window
    window: tuple[int, ...] = ()
    channel_window: int = 1
    groups: int = 1


def _window_range(center: int, width: int) -> range:
    return range(center - (width - 1) // 2, center + width // 2 + 1)


def _members(u, shape, field: RefField):
    """Yield member indices (possibly outside the tensor) of unit ``u``'s field."""
    n, c, *p = u
    N, C, *P = shape
    batch = range(N) if field.batch else [n]
    if field.channels == "self":
        channels = [c]
    elif field.channels == "all":
        channels = range(C)
    elif field.channels == "groups":
        size = C // field.groups
        channels = range((c // size) * size, (c // size + 1) * size)
    else:
        channels = _window_range(c, field.channel_window)
    if field.positions == "self":
        positions = [tuple(p)]
    elif field.positions == "all":
        positions = itertools.product(*(range(s) for s in P))
    else:
        positions = itertools.product(*(_window_range(q, w) for q, w in zip(p, field.window)))
    positions = list(positions)
    for b in batch:
        for ch in channels:
            for pos in positions:
                yield (b, ch, *pos)


def _inside(index, shape) -> bool:
    return all(0 <= i < s for i, s in zip(index, shape))


def ref_field_mean(x: np.ndarray, field: RefField, border: str, divisor_window=None) -> np.ndarray:
    out = np.zeros_like(x)
    for u in itertools.product(*(range(s) for s in x.shape)):
        members = list(_members(u, x.shape, field))
        total = sum(x[m] for m in members if _inside(m, x.shape))
        if border == "valid":
            count = sum(1 for m in members if _inside(m, x.shape))
        else:
            count = len(members)
            if divisor_window is not None and field.positions == "window":
                count = count // int(np.prod(field.window)) * int(np.prod(divisor_window))
        out[u] = total / count
    return out


def ref_divisive_norm(
    x: np.ndarray,
    sum_field: RefField | None,
    sup_field: RefField | None,
    sigma: float = 0.0,
    eps: float = 0.0,
    border: str = "valid",
) -> np.ndarray:
    features = x.ndim == 2 and any(
        f is not None and f.positions == "window" for f in (sum_field, sup_field)
    )
    if features:  # feature vectors: the C features are one row of positions
        x = x[:, None, :]
    v = x - ref_field_mean(x, sum_field, border) if sum_field is not None else x
    if sup_field is None:
        y = v
    else:
        quirk = (
            border == "reference"
            and sum_field is not None
            and sum_field.positions == "window"
            and sup_field.positions == "window"
        )
        energy = ref_field_mean(v * v, sup_field, border, sum_field.window if quirk else None)
        y = v / np.sqrt(sigma**2 + eps + energy)
    return y[:, 0, :] if features else y
