"""``convert_norms``: a registry norm in place of every torch norm layer of a model.

    model = torchvision.models.resnet18(weights=None)
    convert_norms(model, "dn*")             # in place; returns model
    convert_norms(vit, "ln", dry_run=True)   # [(name, old, new), ...], nothing changed

Which layers: exactly ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``InstanceNorm1d/2d/3d``,
``LayerNorm``, ``GroupNorm``, torchvision's ``LayerNorm2d`` (ConvNeXt) and Lightning's
``_BatchNormXd`` (what ``sync_batchnorm`` reverts to), plus any class given a handler with
:func:`register_norm_handler`. Any other subclass of a torch norm (a norm + activation layer,
torchvision's ``FrozenBatchNorm2d``) is refused with an error naming it, never changed
silently: exclude it, or register a handler that says what it computes. So are the norms
of torch's ``nn.TransformerEncoderLayer``, whose fused eval fast path reads them as
LayerNorms.

Layout: the new norm sees the tensor as ``(N, C, *positions)``, so a local window runs over
the positions the tensor really has:

====================================  =====================  ==============================
layer                                 input                  the new norm's positions
====================================  =====================  ==============================
BatchNorm, InstanceNorm, GroupNorm    ``(N, C, *P)``         ``P`` (``(N, C)``: a window
                                                             reads the C features as a row)
LayerNorm2d (torchvision ConvNeXt)    ``(N, C, H, W)``       ``H, W``
``LayerNorm(C)``                      ``(N, *P, C)``         ``P``: the ``L`` tokens of
                                                             ``(N, L, C)``, ``H, W`` of a
                                                             channels-last map
``LayerNorm(C)`` in torch's           ``(L, N, C)``          ``L`` (``batch_first=False``)
Transformer layers
``LayerNorm((C, *P))``                ``(N, C, *P)``         ``P``
====================================  =====================  ==============================

The rule reads only the module: a one-dimensional ``normalized_shape`` normalizes the last
dimension, which :class:`LayoutAdapter` moves to dim 1 and back (any rank: features, tokens,
channels-last maps); its parent tells whether it sits in a sequence-first torch
``nn.TransformerDecoderLayer`` or is the final norm of a sequence-first
``nn.TransformerEncoder``/``Decoder``; ``layout="sequence_first"`` says so for other
sequence-first models.

Same kind: when both of the new norm's fields are the layer's own (bn for BatchNorm, in for
InstanceNorm, gn for GroupNorm, ln for LayerNorm), it takes over the layer's eps, momentum,
groups, per-channel affine weights, running statistics and ``num_batches_tracked`` (and the
synchronization of a ``SyncBatchNorm``, over all ranks), and its lack of them: a layer without
affine weights (``affine=False``, ``elementwise_affine=False``, InstanceNorm's default) gives a
norm without them, one with a weight and no bias a norm with ``bias=False``; unless the spec
sets them. So with ``sigma = 0`` the converted model has the layer's parameter and buffer
names and shapes and computes the same function, in training as in eval. In a LayerNorm's
place the "layer" field spans what the LayerNorm spans: the channels at each position for
``LayerNorm(C)`` and ``LayerNorm2d`` (each token of a ViT, each pixel of a ConvNeXt),
channels and positions for ``LayerNorm((C, *P))``. A norm of another kind carries nothing,
even where one of its fields is the layer's (rmsnorm or gdn in a LayerNorm's place, frn in an
InstanceNorm's, bnms in a BatchNorm's): it starts from its own parameters and eps.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from lit_divnorm.norm.fields import PRESETS, Field, parse_field
from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.registry import NormSpec, _base_callable, build_norm, resolve_norm

Layout = Literal["channels_first", "channels_last", "sequence_first"]
Selector = str | type[nn.Module]

PER_POSITION_LAYER = PRESETS["position"]


@dataclasses.dataclass(frozen=True)
class NormSource:
    """What a norm layer computes and holds: the input of a conversion.

    Attributes:
        num_features: ``C``.
        layout: how its input holds the channels (see the module docstring).
        field: the set it normalizes over (its summation and suppression field).
        eps, momentum: as in torch (``momentum=None``: a cumulative average).
        weight, bias: its affine parameters (``None`` without); ``(C,)`` to be carried.
        running_mean, running_var: ``(C,)`` running statistics, ``None`` when not tracked.
        sync_batch: its batch statistics span every rank (``SyncBatchNorm``).
        num_batches_tracked: its 0-d count of training batches (``None`` when not tracked).
        after: behaviour the layer adds after normalizing (e.g. the activation of a
            norm + activation layer), kept after the new norm.
    """

    num_features: int
    layout: Layout
    field: Field
    eps: float
    momentum: float | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    sync_batch: bool = False
    after: nn.Module | None = None
    num_batches_tracked: Tensor | None = None


NormHandler = Callable[[nn.Module], NormSource]


class NormConversion(NamedTuple):
    """One replacement: the module's qualified name, the old layer, the new one."""

    name: str
    old: nn.Module
    new: nn.Module

    def __str__(self) -> str:
        return f"{self.name or '<model>'}: {self.old} -> {self.new}"


class LayoutAdapter(nn.Module):
    """Run a channels-first norm ``(N, C, *positions)`` on a tensor of another layout.

    ``"channels_last"``: ``(N, *positions, C)`` -> ``(N, C, *positions)`` -> back (ViT tokens
    ``(N, L, C)``, Swin/ConvNeXt maps ``(N, H, W, C)``, feature vectors ``(N, C)``);
    ``"sequence_first"``: ``(L, N, C)`` -> ``(N, C, L)`` -> back.
    """

    def __init__(self, norm: nn.Module, layout: Layout) -> None:
        super().__init__()
        if layout not in ("channels_last", "sequence_first"):
            raise ValueError(
                f"LayoutAdapter layout must be 'channels_last' or 'sequence_first', got {layout!r}"
            )
        self.norm = norm
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "channels_last":
            return self.norm(x.movedim(-1, 1)).movedim(1, -1)
        if x.ndim != 3:
            raise ValueError(f"a sequence-first norm expects (L, N, C), got shape {tuple(x.shape)}")
        return self.norm(x.permute(1, 2, 0)).permute(2, 0, 1)

    def extra_repr(self) -> str:
        return f"layout={self.layout}"


def _tensor(value: Any) -> Tensor | None:
    return value if isinstance(value, Tensor) else None


def describe_norm(module: nn.Module) -> NormSource:
    """The :class:`NormSource` of any instance of torch's BatchNorm, SyncBatchNorm,
    InstanceNorm, LayerNorm or GroupNorm classes (read from their attributes, whatever the
    subclass: a handler for a subclass may start from it)."""
    if isinstance(module, _NormBase):
        field = PRESETS["instance"] if isinstance(module, _InstanceNorm) else PRESETS["batch"]
        tracked = module.track_running_stats
        return NormSource(
            num_features=module.num_features,
            layout="channels_first",
            field=field,
            eps=module.eps,
            momentum=module.momentum,
            weight=_tensor(module.weight),
            bias=_tensor(module.bias),
            running_mean=module.running_mean if tracked else None,
            running_var=module.running_var if tracked else None,
            sync_batch=isinstance(module, nn.SyncBatchNorm),
            num_batches_tracked=_tensor(module.num_batches_tracked) if tracked else None,
        )
    if isinstance(module, nn.GroupNorm):
        return NormSource(
            num_features=module.num_channels,
            layout="channels_first",
            field=Field(channels="groups", groups=module.num_groups, positions="all"),
            eps=module.eps,
            weight=_tensor(module.weight),
            bias=_tensor(module.bias),
        )
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        last_dim = len(shape) == 1
        return NormSource(
            num_features=shape[0],
            layout="channels_last" if last_dim else "channels_first",
            field=PER_POSITION_LAYER if last_dim else PRESETS["layer"],
            eps=module.eps,
            weight=_tensor(module.weight),
            bias=_tensor(module.bias),
        )
    raise TypeError(
        "describe_norm takes a torch BatchNorm, SyncBatchNorm, InstanceNorm, LayerNorm or "
        f"GroupNorm, got {type(module).__qualname__}"
    )


def _describe_layer_norm_2d(module: nn.Module) -> NormSource:
    """torchvision's ConvNeXt ``LayerNorm2d``: channels-first, over the channels at each
    position (it permutes to channels-last and back)."""
    return dataclasses.replace(describe_norm(module), layout="channels_first")


_HANDLERS: dict[type[nn.Module], NormHandler] = {
    cls: describe_norm
    for cls in (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
    )
}
# exact classes of other libraries, by qualified name (no import of those libraries here)
_NAMED_HANDLERS: dict[str, NormHandler] = {
    "torchvision.models.convnext.LayerNorm2d": _describe_layer_norm_2d,
    "lightning.pytorch.plugins.layer_sync._BatchNormXd": describe_norm,
}
_REFUSED: dict[str, str] = {
    "torchvision.ops.misc.FrozenBatchNorm2d": (
        "it keeps its statistics and affine weights frozen (fixed buffers), which no registry "
        "norm reproduces"
    ),
}


def register_norm_handler(
    cls: type[nn.Module], handler: NormHandler, *, overwrite: bool = False
) -> None:
    """Let :func:`convert_norms` convert layers of exactly type ``cls``.

    ``handler(module)`` returns the module's :class:`NormSource`, e.g. for a norm +
    activation layer: ``lambda m: dataclasses.replace(describe_norm(m), after=m.act)``.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module class, got {cls!r}")
    if not callable(handler):
        raise TypeError(f"handler for {cls.__qualname__} must be callable, got {handler!r}")
    if cls in _HANDLERS and not overwrite:
        raise ValueError(f"{cls.__qualname__} already has a norm handler; pass overwrite=True")
    _HANDLERS[cls] = handler


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _handler_for(module: nn.Module) -> NormHandler | None:
    cls = type(module)
    return _HANDLERS.get(cls) or _NAMED_HANDLERS.get(_qualified_name(cls))


def _is_norm(module: nn.Module) -> bool:
    """A layer convert_norms converts or refuses (rather than walking into)."""
    if _handler_for(module) is not None or _qualified_name(type(module)) in _REFUSED:
        return True
    return isinstance(module, (_NormBase, nn.LayerNorm, nn.GroupNorm))


def _refusal(name: str, module: nn.Module, reason: str | None = None) -> str:
    cls = type(module)
    reason = reason or _REFUSED.get(_qualified_name(cls))
    if reason is None and isinstance(module, nn.modules.lazy.LazyModuleMixin):
        reason = "its parameters are not initialized yet (run one forward first)"
    if reason is None:
        bases = [b.__qualname__ for b in cls.__mro__[1:] if b in _HANDLERS]
        base = bases[0] if bases else "a torch norm"
        reason = (
            f"it subclasses {base} and may compute something else (e.g. a norm + activation "
            "layer); only exact known types convert"
        )
    return (
        f"cannot convert {name or '<model>'!r} ({cls.__qualname__}): {reason}. Exclude it "
        f"(exclude=[{cls.__qualname__}] or its name) or describe it with "
        "register_norm_handler"
    )


def _sequence_first_parent(parent: nn.Module | None) -> bool:
    layers: Iterable[nn.Module] = ()
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        layers = (parent,)
    elif isinstance(parent, (nn.TransformerEncoder, nn.TransformerDecoder)):
        layers = parent.layers[:1]
    return any(not layer.self_attn.batch_first for layer in layers)


def _check_selectors(value: Any, name: str) -> tuple[Selector, ...]:
    if value is None:
        return ()
    is_iterable = isinstance(value, Iterable) and not isinstance(value, (str, type))
    items = tuple(value) if is_iterable else (value,)
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(
                f"{name} takes module-name glob patterns (str) and nn.Module types, "
                f"got {item!r} ({type(item).__name__})"
            )
    if not items:
        raise ValueError(f"{name} is empty; pass None for no {name} filter")
    return items


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    return isinstance(module, selector)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """A norm layer in the model: where it is registered, and what is known from its place."""

    name: str
    module: nn.Module
    parent: nn.Module | None
    attr: str | None
    sequence_first: bool
    refusal: str | None = None


def _find_norms(model: nn.Module, layout: Layout | None) -> list[_Slot]:
    """Every norm layer, a shared layer once per place it is registered (each place is
    replaced); the walk does not enter a norm layer."""
    found = []

    def visit(module: nn.Module, name: str, parent: nn.Module | None, attr: str | None) -> None:
        if _is_norm(module):
            sequence_first = layout == "sequence_first" or (
                layout is None and _sequence_first_parent(parent)
            )
            refusal = None
            if isinstance(parent, nn.TransformerEncoderLayer):
                refusal = (
                    "torch's TransformerEncoderLayer (and TransformerEncoder) run a fused "
                    "eval fast path that reads norm1 and norm2 as LayerNorms (weight, bias, "
                    "eps), which another norm would break or bypass"
                )
            found.append(_Slot(name, module, parent, attr, sequence_first, refusal))
            return
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name, module, child_name)

    visit(model, "", None, None)
    return found


@overload
def convert_norms(
    model: nn.Module,
    spec: NormSpec,
    *,
    include: Selector | Iterable[Selector] | None = ...,
    exclude: Selector | Iterable[Selector] | None = ...,
    layout: Layout | None = ...,
    dry_run: Literal[False] = ...,
    **overrides: Any,
) -> nn.Module: ...


@overload
def convert_norms(
    model: nn.Module,
    spec: NormSpec,
    *,
    include: Selector | Iterable[Selector] | None = ...,
    exclude: Selector | Iterable[Selector] | None = ...,
    layout: Layout | None = ...,
    dry_run: Literal[True],
    **overrides: Any,
) -> list[NormConversion]: ...


def convert_norms(
    model: nn.Module,
    spec: NormSpec,
    *,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
    layout: Layout | None = None,
    dry_run: bool = False,
    **overrides: Any,
) -> nn.Module | list[NormConversion]:
    """Replace every torch norm layer of ``model`` by ``build_norm(spec, C, **overrides)``.

    Works in place, as ``SyncBatchNorm.convert_sync_batchnorm`` does: each norm layer is
    replaced in its parent and ``model`` itself is returned, unless ``model`` is itself a norm
    layer (then the new layer is returned). Every new layer is built and checked before the
    first is placed, so an error leaves ``model`` as it was. A new layer takes the device,
    dtype and train/eval mode of the one it replaces. See the module docstring for which
    layers convert, the layout rule and what a same-kind conversion carries over.

    Args:
        model: the network (for example a torchvision model).
        spec: a registry name (``"dn*"``), a mapping with overrides, or a factory; see
            :func:`~lit_divnorm.norm.build_norm`.
        include: convert only norm layers matching one of these: ``nn.Module`` types
            (``isinstance``) or glob patterns of their qualified names (``"features.*"``);
            ``None``: all.
        exclude: leave norm layers matching one of these unchanged (same forms).
        layout: ``"channels_last"`` or ``"sequence_first"``: how the input of every selected
            ``LayerNorm(C)`` holds its channels (``None``: by the rule).
        dry_run: change nothing; return the list of :class:`NormConversion`
            ``(name, old, new)`` that would be made.
        overrides: keyword arguments of the new norms (``window=5``, ``sigma=1.0``, ...).

    Raises:
        ValueError: no norm layer to convert, an unknown spec, an include/exclude entry that
            matches no norm layer, a layer the spec cannot build (e.g. groups that do not
            divide its channels), or state a same-kind conversion cannot carry; each names
            the module and the value.
        TypeError: a wrong argument type, or a norm subclass convert_norms does not know.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layout is not None and layout not in ("channels_last", "sequence_first"):
        raise ValueError(
            f"layout must be 'channels_last', 'sequence_first' or None, got {layout!r}"
        )
    includes = _check_selectors(include, "include")
    excludes = _check_selectors(exclude, "exclude")
    try:
        resolve_norm(spec, **overrides)  # an unknown name or a malformed spec, before any work
    except (TypeError, ValueError) as error:
        raise type(error)(f"convert_norms spec={spec!r}: {error}") from error

    found = _find_norms(model, layout)
    if not found:
        raise ValueError(
            f"model {type(model).__name__} has no norm layer to convert (looked for torch's "
            "BatchNorm, SyncBatchNorm, InstanceNorm, LayerNorm, GroupNorm and registered "
            "handlers)"
        )
    selected = [
        slot
        for slot in found
        if (not includes or any(_matches(s, slot.name, slot.module) for s in includes))
        and not any(_matches(s, slot.name, slot.module) for s in excludes)
    ]
    for selectors, what in ((includes, "include"), (excludes, "exclude")):
        for selector in selectors:
            if not any(_matches(selector, slot.name, slot.module) for slot in found):
                names = ", ".join(repr(slot.name) for slot in found[:8])
                more = f" and {len(found) - 8} more" if len(found) > 8 else ""
                raise ValueError(
                    f"{what} entry {selector!r} matches no norm layer of "
                    f"{type(model).__name__}; its norm layers are {names}{more}"
                )
    if not selected:
        raise ValueError(
            f"include={include!r} and exclude={exclude!r} leave no norm layer of "
            f"{type(model).__name__} to convert"
        )

    built: dict[int, nn.Module] = {}
    plan = []
    for slot in selected:
        if id(slot.module) not in built:
            built[id(slot.module)] = _convert_one(slot, spec, overrides, model)
        plan.append((slot, NormConversion(slot.name, slot.module, built[id(slot.module)])))
    if dry_run:
        return [conversion for _, conversion in plan]
    for slot, conversion in plan:
        if slot.parent is None:
            return conversion.new
        setattr(slot.parent, slot.attr, conversion.new)
    return model


def _convert_one(
    slot: _Slot, spec: NormSpec, overrides: Mapping[str, Any], model: nn.Module
) -> nn.Module:
    module, label = slot.module, repr(slot.name or "<model>")
    handler = _handler_for(module)
    if handler is None or slot.refusal is not None:
        raise TypeError(_refusal(slot.name, module, slot.refusal))
    try:
        source = handler(module)
        if not isinstance(source, NormSource):
            raise TypeError(
                f"the norm handler of {type(module).__qualname__} must return a NormSource, "
                f"got {type(source).__name__}"
            )
        if slot.sequence_first and source.layout == "channels_last":
            source = dataclasses.replace(source, layout="sequence_first")
        norm = _build_target(source, spec, overrides)
    except (TypeError, ValueError) as error:
        raise type(error)(f"cannot convert {label} ({module}) to {spec!r}: {error}") from error
    new = norm if source.layout == "channels_first" else LayoutAdapter(norm, source.layout)
    if source.after is not None:
        new = nn.Sequential(new, source.after)
    reference = _floating_tensor(module)
    reference = _floating_tensor(model) if reference is None else reference
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
    return new.train(module.training)


def _floating_tensor(module: nn.Module) -> Tensor | None:
    """The first floating-point parameter or buffer (device and dtype of a new layer)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _build_target(source: NormSource, spec: NormSpec, overrides: Mapping[str, Any]) -> nn.Module:
    """``build_norm`` for the source's channels; for a DivisiveNorm of the source's kind, with
    the settings and state that make it compute what the source computes."""
    factory, kwargs = resolve_norm(spec, **overrides)
    base, keywords = _base_callable(factory)
    if not (isinstance(base, type) and issubclass(base, DivisiveNorm)):
        return build_norm(spec, source.num_features, **overrides)
    explicit = set(kwargs) | (set() if isinstance(spec, (str, Mapping)) else set(keywords))
    settings = _field_settings(source, base, {**keywords, **kwargs}, explicit)
    norm = build_norm(spec, source.num_features, **overrides, **settings)
    if not norm.sum_field == norm.sup_field == source.field:  # another kind: nothing carried
        return norm
    carried = _carried_settings(source, norm, explicit)
    if carried:
        norm = build_norm(spec, source.num_features, **overrides, **settings, **carried)
    _carry_state(source, norm)
    return norm


def _field_settings(
    source: NormSource,
    factory_class: type[DivisiveNorm],
    arguments: Mapping[str, Any],
    explicit: set[str],
) -> dict[str, Any]:
    """In a LayerNorm(C)'s place the layer field is per position; in a GroupNorm's place a
    group field takes its groups (unless the spec sets the field or the groups). Only for
    norms whose fields are arguments (not the fixed fields of a subclass such as gdn)."""
    defaults = inspect.signature(factory_class).parameters
    settings: dict[str, Any] = {}
    for key in ("sum_field", "sup_field"):
        if key not in defaults:
            continue
        field = parse_field(arguments.get(key, defaults[key].default), key)
        if field is None or key in explicit:
            continue
        if field == PRESETS["layer"] and source.field == PER_POSITION_LAYER:
            settings[key] = PER_POSITION_LAYER
        elif (
            source.field.channels == field.channels == "groups"
            and field.replace(groups=source.field.groups) == source.field
            and "groups" not in explicit
        ):
            settings["groups"] = source.field.groups
    return settings


def _carried_settings(
    source: NormSource, norm: DivisiveNorm, explicit: Mapping[str, Any]
) -> dict[str, Any]:
    settings: dict[str, Any] = {"eps": float(source.eps)} if "eps" not in explicit else {}
    has_running = norm.running_mean is not None or norm.running_var is not None
    if has_running and source.running_mean is not None and "momentum" not in explicit:
        if source.momentum is None:
            raise ValueError(
                "momentum=None (a cumulative average of the running statistics) has no "
                "counterpart; pass momentum= to convert_norms"
            )
        settings["momentum"] = float(source.momentum)
    if source.sync_batch and "sync_batch" not in explicit:
        settings["sync_batch"] = True
    # no affine weights where the layer has none (BatchNorm(affine=False), InstanceNorm's
    # default, LayerNorm(elementwise_affine=False)), no bias where it has a weight only
    if "affine" not in explicit and source.weight is None and norm.weight is not None:
        settings["affine"] = False
    elif "bias" not in explicit and source.weight is not None and source.bias is None:
        if norm.bias is not None:
            settings["bias"] = False
    return settings


def _carry_state(source: NormSource, norm: DivisiveNorm) -> None:
    """Copy the per-channel affine and running statistics into ``norm`` (same kind)."""
    channels = (source.num_features,)
    with torch.no_grad():
        for key in ("weight", "bias"):
            value, target = getattr(source, key), getattr(norm, key)
            if value is None or target is None:
                continue
            if tuple(value.shape) != channels:
                raise ValueError(
                    f"its elementwise affine {key} of shape {tuple(value.shape)} cannot be "
                    f"carried into a per-channel affine of shape {channels}; pass affine=False "
                    "or exclude it"
                )
            target.copy_(value)
            target.requires_grad_(value.requires_grad)
        if norm.running_mean is None and norm.running_var is None:
            if source.running_mean is not None:
                raise ValueError(
                    "it tracks running statistics (track_running_stats=True) that this norm "
                    "has no place for, so its eval output would change"
                )
            return
        if source.running_mean is None:  # the source always uses the batch statistics
            norm.register_buffer("running_mean", None)
            norm.register_buffer("running_var", None)
            return
        for key in ("running_mean", "running_var"):
            target = getattr(norm, key)
            if target is not None:
                target.copy_(getattr(source, key))
        if source.num_batches_tracked is not None:  # (the same state_dict as the layer's)
            norm.register_buffer("num_batches_tracked", source.num_batches_tracked.clone())
