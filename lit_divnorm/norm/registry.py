"""Names -> normalization layers: every variant of the paper is one registry key.

``build_norm(spec, num_features, **overrides)`` builds a module for ``(N, C, ...)`` inputs
with ``C = num_features``; ``spec`` is a registry name, a mapping ``{"name": ..., **overrides}``,
a callable taking ``num_features`` first (a class or a ``functools.partial``), or ``None``.

Defaults follow the paper (PAPER.md section 2, CIFAR-10 column): "-s" adds ``sigma``, "-l1"
adds the L1 penalty, "*" both; LN-s, LN* and every DN variant have no affine ``gamma, beta``.
Plain bn / ln / in / gn use ``sigma=0`` with ``eps=1e-5`` and so equal torch's layers.

=============  ===========  ===========  =====  ======  =====  ================================
name           sum_field    sup_field    sigma  affine  l1     also
=============  ===========  ===========  =====  ======  =====  ================================
none           (identity)
baseline-l1    none         none         -      no      0.01
bn             batch        batch        0      yes     0
bn-s           batch        batch        1.0    yes     0
bn-l1          batch        batch        0      yes     0.005
bn*            batch        batch        1.0    yes     0.005
bnms           batch        none         -      yes     0
ln             layer        layer        0      yes     0
ln-s           layer        layer        0.5    no      0
ln-l1          layer        layer        0      yes     0.005
ln*            layer        layer        0.5    no      0.005
lnms           layer        none         -      yes     0
dn             local        local        0.5    no      0
dn*            local        local        0.5    no      0.005
dnms           local        none         -      no      0
in             instance     instance     0      yes     0
gn             group (32)   group (32)   0      yes     0
lrn            none         channel (5)  1.0    no      0
lrn-alexnet    none         channel (5)  0      no      0      alpha 1e-4, power 0.75, eps 2
rmsnorm        none         position     0      gamma   0      eps 1e-6
frn            none         instance     0      yes     0      eps 1e-6, TLU max(y, tau)
gdn, igdn      none         position     -      no      0      learned beta, gamma (C, C)
lcn            local (9)    local (9)    -      no      0      Torch7's threshold 1e-4
=============  ===========  ===========  =====  ======  =====  ================================

Beyond the paper (see :mod:`lit_divnorm.norm.other_norms`): ``lrn-alexnet`` equals torch's
``LocalResponseNorm(5, 1e-4, 0.75, 2)``; ``rmsnorm`` equals ``torch.nn.RMSNorm(C)`` over the
channels at each position (``gamma`` only, no ``beta``); ``frn`` is filter response
normalization with its TLU (Singh & Krishnan 2020); ``gdn``/``igdn`` are Balle et al.'s GDN and
its inverse; ``lcn`` is Torch7's ``SpatialContrastiveNormalization``. Every DivisiveNorm takes
``alpha`` and ``power`` (``y = v (sigma^2 + eps + alpha mean_B(v^2))^(-power)``) and
``channel_window`` (the width of a channel-window field).

Local windows default to 3 (lcn's to Torch7's 9); models pass their per-layer windows with
``layer_window``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lit_divnorm.norm.fields import Window, parse_field
from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.other_norms import (
    FilterResponseNorm,
    GeneralizedDivisiveNorm,
    LocalContrastNorm,
)

NormFactory = Callable[..., nn.Module]
NormSpec = str | Mapping[str, Any] | NormFactory | None

_REGISTRY: dict[str, NormFactory] = {}
_WINDOW_KEYS = ("window", "sum_window", "sup_window")


class Identity(nn.Identity):
    """No normalization (registry name ``"none"``); takes ``num_features`` like the others."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def register_norm(name: str, factory: NormFactory | None = None, *, overwrite: bool = False):
    """Register ``factory`` (called as ``factory(num_features, **overrides)``) under ``name``.

    Usable as a decorator: ``@register_norm("my-norm")``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    key = name.lower()

    def decorate(fn: NormFactory) -> NormFactory:
        if not callable(fn):
            raise TypeError(f"factory for {name!r} must be callable, got {type(fn).__name__}")
        if key in _REGISTRY and not overwrite:
            raise ValueError(f"norm {name!r} is already registered; pass overwrite=True")
        _REGISTRY[key] = fn
        return fn

    return decorate if factory is None else decorate(factory)


def list_norms() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_norm_factory(name: str) -> NormFactory:
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(list_norms())}")
    return _REGISTRY[key]


def resolve_norm(spec: NormSpec, **overrides: Any) -> tuple[NormFactory, dict[str, Any]]:
    """Split a spec into a factory and its keyword arguments (overrides win over the spec's)."""
    if spec is None:
        return _REGISTRY["none"], dict(overrides)
    if isinstance(spec, str):
        return get_norm_factory(spec), dict(overrides)
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        if "name" not in kwargs:
            raise ValueError(f"a norm mapping needs a 'name' key, got keys {sorted(kwargs)}")
        name = kwargs.pop("name")
        return get_norm_factory(name), {**kwargs, **overrides}
    if callable(spec):
        return spec, dict(overrides)
    raise TypeError(
        "norm spec must be a registry name, a mapping with 'name', a callable or None, "
        f"got {type(spec).__name__}"
    )


def build_norm(
    spec: NormSpec, num_features: int, *, layer_window: Window | None = None, **overrides: Any
) -> nn.Module:
    """Build the normalization layer named by ``spec`` for ``num_features`` channels.

    ``layer_window`` is the window a model would like at this slot (e.g. the paper's 5, 3, 3
    for the CIFAR CNN); it applies only when the norm has a local field and no window is given
    explicitly, so a model can pass it whatever norm the user chose.

    Example: ``build_norm("dn*", 32, window=5, sigma=0.5, l1=0.005)``.
    """
    factory, kwargs = resolve_norm(spec, **overrides)
    _check_overrides(spec, factory, kwargs)
    if layer_window is not None and not any(k in kwargs for k in _WINDOW_KEYS):
        if _uses_window(factory, kwargs):
            kwargs["window"] = layer_window
    return factory(num_features, **kwargs)


def _base_callable(factory: NormFactory) -> tuple[Callable[..., Any], dict[str, Any]]:
    keywords: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        keywords = {**factory.keywords, **keywords}
        factory = factory.func
    return factory, keywords


def _uses_window(factory: NormFactory, kwargs: Mapping[str, Any]) -> bool:
    """Whether the norm takes ``window``: a DivisiveNorm when one of its fields is local, any
    other factory (a DivisiveNorm subclass with fixed fields too) when it has the argument."""
    base, keywords = _base_callable(factory)
    try:
        params = inspect.signature(base).parameters
    except (TypeError, ValueError):
        return False
    field_names = [name for name in ("sum_field", "sup_field") if name in params]
    if isinstance(base, type) and issubclass(base, DivisiveNorm) and field_names:
        merged = {**keywords, **kwargs}
        fields = [parse_field(merged.get(name, params[name].default), name) for name in field_names]
        return any(f is not None and f.is_local for f in fields)
    return "window" in params


def _check_overrides(spec: NormSpec, factory: NormFactory, kwargs: Mapping[str, Any]) -> None:
    base, _ = _base_callable(factory)
    try:
        params = inspect.signature(base).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [name for name in params if name != "num_features"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"norm {spec!r} takes no argument(s) {unknown}; allowed: {', '.join(allowed) or 'none'}"
        )


def _entry(sum_field: str | None, sup_field: str | None, **defaults: Any) -> NormFactory:
    return functools.partial(DivisiveNorm, sum_field=sum_field, sup_field=sup_field, **defaults)


register_norm("none", Identity)
register_norm("baseline-l1", _entry(None, None, affine=False, l1=0.01))
register_norm("bn", _entry("batch", "batch", sigma=0.0, affine=True))
register_norm("bn-s", _entry("batch", "batch", sigma=1.0, affine=True))
register_norm("bn-l1", _entry("batch", "batch", sigma=0.0, affine=True, l1=0.005))
register_norm("bn*", _entry("batch", "batch", sigma=1.0, affine=True, l1=0.005))
register_norm("bnms", _entry("batch", None, affine=True))
register_norm("ln", _entry("layer", "layer", sigma=0.0, affine=True))
register_norm("ln-s", _entry("layer", "layer", sigma=0.5, affine=False))
register_norm("ln-l1", _entry("layer", "layer", sigma=0.0, affine=True, l1=0.005))
register_norm("ln*", _entry("layer", "layer", sigma=0.5, affine=False, l1=0.005))
register_norm("lnms", _entry("layer", None, affine=True))
register_norm("dn", _entry("local", "local", sigma=0.5, affine=False))
register_norm("dn*", _entry("local", "local", sigma=0.5, affine=False, l1=0.005))
register_norm("dnms", _entry("local", None, affine=False))
register_norm("in", _entry("instance", "instance", sigma=0.0, affine=True))
register_norm("gn", _entry("group", "group", sigma=0.0, affine=True))
register_norm("lrn", _entry(None, "channel", sigma=1.0, affine=False))
# AlexNet's constants: n = 5, alpha = 1e-4, beta = 0.75, k = sigma^2 + eps = 2, zero padding / n
register_norm(
    "lrn-alexnet",
    _entry(None, "channel", sigma=0.0, eps=2.0, alpha=1e-4, power=0.75, border="reference"),
)
register_norm("rmsnorm", _entry(None, "position", sigma=0.0, eps=1e-6, affine=True, bias=False))
register_norm("frn", FilterResponseNorm)
register_norm("gdn", functools.partial(GeneralizedDivisiveNorm, inverse=False))
register_norm("igdn", functools.partial(GeneralizedDivisiveNorm, inverse=True))
register_norm("lcn", LocalContrastNorm)
