"""``DivisiveNorm``: the unified normalizer as an ``nn.Module``.

Batch, layer, instance, group, divisive and local-response normalization are settings of its
two fields (see :mod:`lit_divnorm.norm.fields`)::

    v = x - mean_A(x)
    y = gamma * v / sqrt(sigma^2 + eps + mean_B(v^2)) + beta
    y = gamma * v * (sigma^2 + eps + alpha mean_B(v^2))^(-power) + beta   (alpha, power set)

Shapes: input ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)`` with ``C = num_features``;
output the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_divnorm.norm.fields import Field, FieldSpec, Window, normalize_window, parse_field
from lit_divnorm.norm.functional import (
    Border,
    affine,
    check_border,
    check_exponent,
    check_floor,
    check_input,
    divisive_norm,
    local_config,
)
from lit_divnorm.norm.ops import check_backend, native_local_dn, native_takes
from lit_divnorm.norm.sparsity import record_sparsity, record_term

_NATIVE_PLAN = "_native_plan_cache"


class NativePlan(NamedTuple):
    """A layer's call of the C++ local DN operator (see ``DivisiveNorm._native_plan``)."""

    ndim: int
    call: Callable[[Tensor], list[Tensor]]
    with_l1: bool


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class DivisiveNorm(nn.Module):
    """Normalize over a summation field and a suppression field, with smoothing ``sigma``.

    Args:
        num_features: ``C``, the channels (or features) of the input.
        sum_field: summation field ``A`` (a :class:`Field`, a preset name such as ``"batch"``,
            ``"layer"``, ``"local"``, a mapping, or ``None`` for no centering).
        sup_field: suppression field ``B`` (likewise; ``None``: mean subtraction only).
        sigma: smoothing term under the square root, ``>= 0``; ``sigma = eps = 0`` with a
            suppression field raises ``ValueError`` (a zero floor: NaN on a constant region),
            unless ``learn_sigma`` (a learned sigma stays positive).
        learn_sigma: learn ``sigma`` (kept positive as ``softplus`` of a free parameter;
            needs ``sigma > 0`` to start from).
        affine: learn a per-channel ``gamma`` (init 1) and ``beta`` (init 0).
        bias: with ``affine``, learn ``beta`` too (``False``: ``gamma`` only, as RMSNorm).
        l1: weight ``alpha`` of the sparsity penalty ``alpha * mean|v|`` recorded on each
            training forward (see :mod:`lit_divnorm.norm.sparsity`).
        window: positional window of every local field (an int, or one int per dimension).
        sum_window, sup_window: the window of one field only (win over ``window``).
        groups: number of channel groups of every field with ``channels="groups"``.
        channel_window: width of every field with ``channels="window"`` (LRN's ``n``).
        alpha: scale of the suppression term, ``> 0`` (LRN's ``alpha``).
        power: exponent of the divisor, ``> 0`` (``0.5``: the square root; LRN's ``beta``).
            Torch's ``LocalResponseNorm(n, alpha, beta, k)`` is ``build_norm("lrn", C,
            channel_window=n, alpha=alpha, power=beta, sigma=0, eps=k, border="reference")``
            (``sigma^2 + eps = k``) for odd ``n``; an even window has one more channel after
            the unit than before it, torch's one more before.
        border: ``"valid"`` (average over positions inside the input) or ``"reference"``
            (the authors' zero padding and divisors).
        momentum: update rate of the running statistics of fields that span the batch
            (torch's convention: ``0.1`` is the paper's decay ``0.9``).
        eps: numerical floor under the square root.
        check_finite: raise ``ValueError`` when the input holds NaN or inf.
        sync_batch: fields that span the batch average over every rank's batch under an
            initialized process group (set by :class:`lit_divnorm.distributed.NormSync`,
            which ``--trainer.sync_batchnorm=true`` installs).
        backend: which kernels run (:mod:`lit_divnorm.norm.ops`): ``"auto"``, ``"native"``
            (the C++ kernels, CPU tensors), ``"triton"`` (CUDA tensors; CPU tensors only
            under ``TRITON_INTERPRET=1``), ``"compile"`` (``torch.compile`` of the eager
            kernels) or ``"torch"`` (eager PyTorch). A backend that cannot run on the input
            raises ``ValueError`` saying why (``"triton"`` on a CPU tensor: Triton runs on
            CUDA; ``"native"`` off the CPU or without a compiler). What runs, by field:

            - local DN over all channels (dn, dn*) and the channel window (lrn): the operator
              of :mod:`lit_divnorm.norm.ops` in the backend's kernels; ``"auto"`` is C++ on
              the CPU (where it builds), Triton on CUDA (float64: eager), else eager;
            - local mean subtraction (dnms): C++ under ``"auto"``/``"native"`` for float32
              and float64 CPU tensors, else the eager passes;
            - whole groups of units (bn, ln, in, gn types): with a fixed sigma, no L1 term
              and both fields the same (bn, ln, in, gn, bn-s, ln-s), torch's own
              ``batch_norm``/``group_norm`` under every backend (rmsnorm: ``rms_norm``);
              with an L1 term, mean subtraction only, no centring or a learned sigma (bn*,
              ln*, bnms, lnms, frn, ...) the C++ ``field_norm`` under ``"auto"``/
              ``"native"`` for float32/float64 CPU tensors in training (and without running
              statistics in eval), else torch's kernels and the L1 term, or the equations
              term by term (``"triton"`` has no kernel of its own for these fields);
            - under ``torch.compile``: the operators for local DN and the channel window, and
              plain tensor operations (no C++) for everything else;
            - under ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...): every field
              in its eager torch formula, which the transform differentiates and batches.
              Fields that span the batch follow torch.func's BatchNorm recipe: eval mode uses
              the running statistics; to train under ``vmap`` drop them
              (``layer.running_mean = layer.running_var = None``) and each vmapped sample is a
              batch of its own. An L1 term recorded under a transform holds its tensors.

    Dtype rule, on every path (the C++ shortcut, every ``backend``, ``check_finite``,
    ``torch.compile``): the output has the input's dtype, whatever the dtype of the parameters
    and running statistics (they are brought to the computation's dtype and the running
    statistics updated in their own). Statistics are computed in float32 for float16/bfloat16
    inputs and in the input's dtype otherwise, under autocast too. Torch's own norms follow the
    input where they accept mixed dtypes (float32 parameters with a bfloat16 input;
    ``LocalResponseNorm`` with any) and refuse other mixes; this layer accepts them all. So
    ``model.half()`` or ``.double()`` with inputs of another dtype works, and a float64 layer on
    a float32 input returns float32.
    """

    _own_floor = False  # a subclass whose forward has its own floor (gdn, lcn): no floor check

    def __init__(
        self,
        num_features: int,
        sum_field: FieldSpec = "local",
        sup_field: FieldSpec = "local",
        *,
        sigma: float = 0.5,
        learn_sigma: bool = False,
        affine: bool = False,
        bias: bool = True,
        l1: float = 0.0,
        window: Window | None = None,
        sum_window: Window | None = None,
        sup_window: Window | None = None,
        groups: int | None = None,
        channel_window: int | None = None,
        alpha: float = 1.0,
        power: float = 0.5,
        border: Border = "valid",
        momentum: float = 0.1,
        eps: float = 1e-5,
        check_finite: bool = False,
        sync_batch: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise TypeError(f"num_features must be a positive int, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features}")
        _check_number("sigma", sigma, low=0.0)
        _check_number("l1", l1, low=0.0)
        _check_number("eps", eps, low=0.0)
        _check_number("momentum", momentum, low=0.0, high=1.0)
        check_exponent(alpha, power)
        check_border(border)
        check_backend(backend)
        if learn_sigma and sigma <= 0:
            raise ValueError(f"learn_sigma=True needs sigma > 0 to start from, got sigma={sigma}")

        sum_spec = parse_field(sum_field, "sum_field")
        sup_spec = parse_field(sup_field, "sup_field")
        sum_spec, sup_spec = _apply_windows(sum_spec, sup_spec, window, sum_window, sup_window)
        sum_spec, sup_spec = _apply_groups(sum_spec, sup_spec, groups, num_features)
        sum_spec, sup_spec = _apply_channel_window(sum_spec, sup_spec, channel_window)
        if not learn_sigma and not self._own_floor:  # (a learned sigma: softplus > 0)
            check_floor(float(sigma), float(eps), divides=sup_spec is not None)

        self.num_features = num_features
        self.sum_field = sum_spec
        self.sup_field = sup_spec
        self.learn_sigma = learn_sigma
        self.affine = affine
        self.alpha = float(alpha)
        self.power = float(power)
        self.l1 = float(l1)
        self.border = border
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.check_finite = check_finite
        self.sync_batch = sync_batch
        self.backend = backend
        if learn_sigma:
            self.raw_sigma = nn.Parameter(torch.tensor(_inverse_softplus(float(sigma))))
        else:
            self.fixed_sigma = float(sigma)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            if bias:
                self.bias = nn.Parameter(torch.zeros(num_features))
        for name, field in (("running_mean", sum_spec), ("running_var", sup_spec)):
            if field is not None and field.batch:
                init = torch.zeros if name == "running_mean" else torch.ones
                self.register_buffer(name, init(num_features))
            else:
                self.register_buffer(name, None)
        # a 0-d count of training batches where a conversion carries a torch norm's (None:
        # not in the state_dict)
        self.register_buffer("num_batches_tracked", None)

    @property
    def sigma(self) -> float | Tensor:
        """The smoothing term: a float, or a positive 0-d tensor when learned."""
        if self.learn_sigma:
            return F.softplus(self.raw_sigma)
        return self.fixed_sigma

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            self.running_mean.zero_()
        if self.running_var is not None:
            self.running_var.fill_(1.0)

    def _floor_terms(self) -> tuple[float | Tensor, float | Tensor]:
        """``(sigma, eps)``: the floor ``sigma^2 + eps`` under the divisor."""
        return self.sigma, self.eps

    def _check_input(self, x: Tensor) -> None:
        check_input(x, "input")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expected input with {self.num_features} channels "
                f"(num_features) at dim 1, got shape {tuple(x.shape)}"
            )
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError(
                f"{type(self).__name__} input holds NaN or inf (check_finite=True), "
                f"shape {tuple(x.shape)}"
            )

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__.pop(_NATIVE_PLAN, None)  # any setting may change the plan

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # (compiled: the general path's custom ops)
            plan = self.__dict__.get(_NATIVE_PLAN)
            if plan is None:
                plan = self.__dict__[_NATIVE_PLAN] = self._native_plan(x.ndim)
            if plan and x.ndim == plan.ndim and x.shape[1] == self.num_features:
                if native_takes(x):  # the C++ operator (not under torch.func, autocast)
                    outputs = plan.call(x)
                    if plan.with_l1:
                        record_term(self, outputs[1])
                    if self.affine:  # (the output keeps x's dtype, whatever the weights')
                        y = affine(outputs[0], self.weight, self.bias)
                        return y if y.dtype is x.dtype else y.to(x.dtype)
                    return outputs[0]
        return self._forward_general(x)

    def _native_plan(self, ndim: int) -> NativePlan | tuple[()]:
        """What :meth:`forward` calls for ``ndim``-D inputs when the layer is local DN over all
        channels with a fixed floor and ``backend`` runs the C++ kernels
        (:func:`lit_divnorm.norm.ops.native_local_dn` decides); ``()`` otherwise. Kept until
        an attribute is set."""
        sigma, eps = self._floor_terms()
        if (
            self.check_finite
            or (self.alpha, self.power) != (1.0, 0.5)
            or isinstance(sigma, Tensor)
            or isinstance(eps, Tensor)
            or ndim < 3
        ):
            return ()
        config = local_config(self.sum_field, self.sup_field, self.border, ndim)
        if config is None:
            return ()
        with_l1 = self.l1 > 0 and self.training
        call = native_local_dn(config, sigma * sigma + eps, with_l1, self.l1, self.backend)
        return () if call is None else NativePlan(ndim, call, with_l1)

    def _forward_general(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training and self.num_batches_tracked is not None:
            if self.running_mean is not None or self.running_var is not None:
                self.num_batches_tracked.add_(1)  # (as torch's norms count, with their stats)
        with_l1 = self.l1 > 0 and self.training
        sigma, eps = self._floor_terms()
        outputs = divisive_norm(
            x,
            self.sum_field,
            self.sup_field,
            sigma,
            eps,
            self.border,
            alpha=self.alpha,
            power=self.power,
            running_mean=self.running_mean,
            running_var=self.running_var,
            training=self.training,
            momentum=self.momentum,
            weight=self.weight,
            bias=self.bias,
            return_l1=with_l1,
            backend=self.backend,
            sync_batch=self.sync_batch,
        )
        if not with_l1:
            return outputs
        y, mean_abs = outputs
        record_sparsity(self, mean_abs, self.l1)
        return y

    def extra_repr(self) -> str:
        def field(spec: Field | None) -> str:
            return "none" if spec is None else spec.describe()

        sigma = f"learned (now {self.sigma.item():.4g})" if self.learn_sigma else self.fixed_sigma
        parts = [
            f"{self.num_features}",
            f"sum_field={field(self.sum_field)}",
            f"sup_field={field(self.sup_field)}",
            *([f"sigma={sigma}"] if self.sup_field is not None else []),
            *([f"alpha={self.alpha}"] if self.alpha != 1.0 else []),
            *([f"power={self.power}"] if self.power != 0.5 else []),
            f"affine={self.affine}",
            *(["bias=False"] if self.affine and self.bias is None else []),
            f"l1={self.l1}",
            f"border={self.border}",
            f"eps={self.eps}",
            *([f"backend={self.backend!r}"] if self.backend != "auto" else []),
        ]
        if self.running_mean is not None or self.running_var is not None:
            parts.append(f"momentum={self.momentum}")
        return ", ".join(parts)


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value}")


def _apply_windows(
    sum_field: Field | None,
    sup_field: Field | None,
    window: Window | None,
    sum_window: Window | None,
    sup_window: Window | None,
) -> tuple[Field | None, Field | None]:
    local = [f for f in (sum_field, sup_field) if f is not None and f.is_local]
    if window is not None:
        window = normalize_window(window, "window")
        if not local:
            raise ValueError(
                f"window={window!r} given, but neither field has a positional window "
                f"(sum_field={sum_field}, sup_field={sup_field})"
            )
        sum_field = sum_field.replace(window=window) if sum_field in local else sum_field
        sup_field = sup_field.replace(window=window) if sup_field in local else sup_field
    for name, value, field in (
        ("sum_window", sum_window, sum_field),
        ("sup_window", sup_window, sup_field),
    ):
        if value is None:
            continue
        value = normalize_window(value, name)
        if field is None or not field.is_local:
            raise ValueError(f"{name}={value!r} given, but that field has no positional window")
        if name == "sum_window":
            sum_field = field.replace(window=value)
        else:
            sup_field = field.replace(window=value)
    return sum_field, sup_field


def _apply_groups(
    sum_field: Field | None, sup_field: Field | None, groups: int | None, num_features: int
) -> tuple[Field | None, Field | None]:
    if groups is not None:
        grouped = [f for f in (sum_field, sup_field) if f is not None and f.channels == "groups"]
        if not grouped:
            raise ValueError(f"groups={groups!r} given, but neither field has channels='groups'")
        sum_field = sum_field.replace(groups=groups) if sum_field in grouped else sum_field
        sup_field = sup_field.replace(groups=groups) if sup_field in grouped else sup_field
    for field in (sum_field, sup_field):
        if field is not None and field.channels == "groups" and num_features % field.groups:
            raise ValueError(f"groups={field.groups} must divide num_features={num_features}")
    return sum_field, sup_field


def _apply_channel_window(
    sum_field: Field | None, sup_field: Field | None, channel_window: int | None
) -> tuple[Field | None, Field | None]:
    if channel_window is None:
        return sum_field, sup_field
    windowed = [f for f in (sum_field, sup_field) if f is not None and f.channels == "window"]
    if not windowed:
        raise ValueError(
            f"channel_window={channel_window!r} given, but neither field has channels='window' "
            f"(sum_field={sum_field}, sup_field={sup_field})"
        )
    sum_field = (
        sum_field.replace(channel_window=channel_window) if sum_field in windowed else sum_field
    )
    sup_field = (
        sup_field.replace(channel_window=channel_window) if sup_field in windowed else sup_field
    )
    return sum_field, sup_field
