"""Summation and suppression fields: which units a normalizer averages over.

For a pre-activation ``z`` and each unit ``j`` the unified framework computes::

    v_j  = z_j - mean_{i in A_j} z_i                       A_j: summation field
    zt_j = v_j / sqrt(sigma^2 + mean_{k in B_j} v_k^2)     B_j: suppression field

A :class:`Field` says, per axis of an input ``(N, C, *positions)``, which neighbours of a
unit belong to its field:

* ``batch``: ``True`` to span the mini-batch (batch normalization);
* ``channels``: ``"self"``, ``"all"``, ``"window"`` (``channel_window`` neighbouring
  channels, as in local response normalization) or ``"groups"`` (``groups`` groups of
  consecutive channels, as in group normalization);
* ``positions``: ``"self"``, ``"all"`` or ``"window"`` (a box of ``window`` positions per
  dimension: an int for every dimension or a tuple with one entry per dimension).

Feature vectors ``(N, C)`` have no positions. For them a field with a positional window reads
the ``C`` features as one row of positions (the paper's divisive normalization of an RNN's
hidden units); such a field must then take ``channels="all"`` or ``"self"``.

The presets name the classical normalizers:

============  =========  ===========  ===========
preset        batch      channels     positions
============  =========  ===========  ===========
``batch``     yes        self         all
``layer``     no         all          all
``instance``  no         self         all
``group``     no         groups       all
``local``     no         all          window
``channel``   no         window       self
``position``  no         all          self
============  =========  ===========  ===========

``position`` spans the channels at one position: a ``LayerNorm(C)`` over each token or pixel,
RMSNorm's and GDN's suppression field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

ChannelSpan = Literal["self", "all", "window", "groups"]
PositionSpan = Literal["self", "all", "window"]
Window = int | tuple[int, ...]

DEFAULT_WINDOW = 3
DEFAULT_GROUPS = 32
DEFAULT_CHANNEL_WINDOW = 5

_CHANNEL_SPANS = ("self", "all", "window", "groups")
_POSITION_SPANS = ("self", "all", "window")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def normalize_window(window: Any, name: str = "window") -> Window:
    """Validate a window: a positive int, or a non-empty tuple/list of positive ints."""
    if isinstance(window, (list, tuple)):
        if len(window) == 0:
            raise ValueError(f"{name} must be a positive int or a non-empty tuple, got {window!r}")
        return tuple(_check_positive_int(f"{name}[{i}]", w) for i, w in enumerate(window))
    return _check_positive_int(name, window)


@dataclasses.dataclass(frozen=True)
class Field:
    """The set of units a normalizer averages over (a summation or a suppression field)."""

    batch: bool = False
    channels: ChannelSpan = "self"
    positions: PositionSpan = "self"
    window: Window | None = None
    groups: int | None = None
    channel_window: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch, bool):
            raise TypeError(f"Field batch must be a bool, got {self.batch!r}")
        if self.channels not in _CHANNEL_SPANS:
            raise ValueError(
                f"Field channels must be one of {_CHANNEL_SPANS}, got {self.channels!r}"
            )
        if self.positions not in _POSITION_SPANS:
            raise ValueError(
                f"Field positions must be one of {_POSITION_SPANS}, got {self.positions!r}"
            )
        if self.positions == "window":
            window = DEFAULT_WINDOW if self.window is None else normalize_window(self.window)
            object.__setattr__(self, "window", window)
        elif self.window is not None:
            raise ValueError(
                f"Field window={self.window!r} needs positions='window', got {self.positions!r}"
            )
        if self.channels == "groups":
            groups = DEFAULT_GROUPS if self.groups is None else self.groups
            object.__setattr__(self, "groups", _check_positive_int("groups", groups))
        elif self.groups is not None:
            raise ValueError(f"Field groups={self.groups!r} needs channels='groups'")
        if self.channels == "window":
            width = DEFAULT_CHANNEL_WINDOW if self.channel_window is None else self.channel_window
            object.__setattr__(self, "channel_window", _check_positive_int("channel_window", width))
        elif self.channel_window is not None:
            raise ValueError(
                f"Field channel_window={self.channel_window!r} needs channels='window'"
            )
        if self.batch and self.positions != "all":
            raise ValueError(
                "a Field that spans the batch must span all positions (positions='all'), "
                f"got positions={self.positions!r}"
            )

    @property
    def is_local(self) -> bool:
        """True when the field has a positional window (``window`` applies to it)."""
        return self.positions == "window"

    def replace(self, **changes: Any) -> Field:
        return dataclasses.replace(self, **changes)

    def window_for(self, num_dims: int) -> tuple[int, ...]:
        """The positional window as one int per dimension of a ``num_dims``-D input."""
        if self.window is None:
            raise ValueError(f"Field {self} has no positional window")
        if isinstance(self.window, int):
            return (self.window,) * num_dims
        if len(self.window) != num_dims:
            raise ValueError(
                f"window {self.window} has {len(self.window)} entries but the input has "
                f"{num_dims} positional dimension(s)"
            )
        return self.window

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``'channels=all, window=5'``."""
        parts = []
        if self.batch:
            parts.append("batch")
        if self.channels == "groups":
            parts.append(f"groups={self.groups}")
        elif self.channels == "window":
            parts.append(f"channel_window={self.channel_window}")
        else:
            parts.append(f"channels={self.channels}")
        if self.positions == "window":
            parts.append(f"window={self.window}")
        else:
            parts.append(f"positions={self.positions}")
        return "(" + ", ".join(parts) + ")"


PRESETS: dict[str, Field] = {
    "batch": Field(batch=True, channels="self", positions="all"),
    "layer": Field(channels="all", positions="all"),
    "instance": Field(channels="self", positions="all"),
    "group": Field(channels="groups", positions="all"),
    "local": Field(channels="all", positions="window"),
    "channel": Field(channels="window", positions="self"),
    "position": Field(channels="all", positions="self"),
}

FieldSpec = Field | str | Mapping[str, Any] | None


def parse_field(spec: FieldSpec, name: str = "field") -> Field | None:
    """Turn a preset name, a mapping of :class:`Field` arguments or a Field into a Field.

    ``None`` stays ``None`` (no summation: no centering; no suppression: no division).
    A mapping may name a preset under ``"preset"`` and change some of its arguments.
    """
    if spec is None or isinstance(spec, Field):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown {name} preset {spec!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[spec]
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        preset = kwargs.pop("preset", None)
        allowed = {f.name for f in dataclasses.fields(Field)}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"unknown {name} keys {unknown}; allowed: {sorted(allowed)} and 'preset'"
            )
        if preset is None:
            return Field(**kwargs)
        return parse_field(preset, name).replace(**kwargs)
    raise TypeError(
        f"{name} must be a Field, a preset name, a mapping or None, got {type(spec).__name__}"
    )
