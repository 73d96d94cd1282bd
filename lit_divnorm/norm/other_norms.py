"""Normalizers from other papers as :class:`DivisiveNorm` subclasses, each a registry name.

Each keeps the framework's fields (``sum_field``, ``sup_field``) and adds the piece its formula
needs. Shapes: input ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)`` with ``C = num_features``;
output the same.

=====================  ========  ==========  ==================================================
class (registry name)  sum       sup         adds
=====================  ========  ==========  ==================================================
FilterResponseNorm     none      instance    ``gamma, beta``, the TLU ``max(y, tau)``, an
(``frn``)                                    optionally learned ``eps``
GeneralizedDivisive    none      position    the learned non-negative ``(C, C)`` ``gamma`` and
Norm (``gdn``,                               ``(C,)`` ``beta`` (CompressAI's parametrization)
``igdn``)
LocalContrastNorm      local     local       Torch7's border coefficient and threshold
(``lcn``)
=====================  ========  ==========  ==================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_divnorm.norm.fields import Window
from lit_divnorm.norm.functional import (
    check_contrast_settings,
    generalized_divisive_norm,
    local_contrast_norm,
)
from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.ops import compute_dtype, full_precision


class FilterResponseNorm(DivisiveNorm):
    """Filter response normalization with its thresholded linear unit (Singh & Krishnan,
    CVPR 2020): no centring, each channel of each sample over all its positions::

        nu^2 = mean over positions of x^2                    (the "instance" field)
        y = gamma * x / sqrt(nu^2 + eps) + beta,   z = max(y, tau)

    ``gamma`` (init 1), ``beta`` and ``tau`` (init 0) are per channel.

    Args:
        num_features: ``C``.
        eps: the constant under the square root (the paper's ``1e-6``), ``> 0`` (0 divides
            0 by 0 on a constant channel), or learned.
        learn_eps: learn ``eps``: a parameter ``eps_l`` that starts at ``eps`` and enters as
            ``|eps_l|``, as in the paper's Listing 1 (``tf.abs(epsilon)``); needs ``eps > 0``.
        tlu: apply the TLU ``max(y, tau)`` (``False``: FRN alone, ``z = y``).

    The forward is the formula in plain torch ops (statistics in float32 or better, the output
    in the input's dtype); the framework's term-by-term path runs only where a framework
    attribute FRN does not use is set afterwards (``l1 > 0``, ``alpha`` or ``power``).
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-6, learn_eps: bool = False, tlu: bool = True
    ) -> None:
        if learn_eps and not eps > 0:
            raise ValueError(f"learn_eps=True needs eps > 0 to start from, got eps={eps}")
        super().__init__(num_features, None, "instance", sigma=0.0, affine=True, eps=eps)
        self.learn_eps = learn_eps
        self.tlu = tlu
        if learn_eps:
            self.raw_eps = nn.Parameter(torch.tensor(float(eps)))
        self.tau = nn.Parameter(torch.zeros(num_features)) if tlu else None

    def _floor_terms(self) -> tuple[float | Tensor, float | Tensor]:
        return 0.0, (self.raw_eps.abs() if self.learn_eps else self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.l1 > 0 or (self.alpha, self.power) != (1.0, 0.5):  # (only set after init)
            return self._forward_framework(x)
        self._check_input(x)
        dtype = compute_dtype(x.dtype)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        positions = tuple(range(2, x.ndim))
        with full_precision(x.device.type):
            xc = x.to(dtype)
            nu2 = (xc * xc).mean(dim=positions, keepdim=True) if positions else xc * xc
            eps = self.raw_eps.to(dtype).abs() if self.learn_eps else self.eps
            scale = self.weight.to(dtype).view(shape) * torch.rsqrt(nu2 + eps)
            beta = self.bias.to(dtype).view(shape)
            if self.tau is None:
                return torch.addcmul(beta, xc, scale).to(x.dtype)
            # max(y, tau) = tau + (d + |d|) / 2 with d = y - tau: exactly tau below it, and
            # torch.maximum's gradient (half to each at a tie), in fewer passes than maximum
            tau = self.tau.to(dtype).view(shape)
            d = torch.addcmul(beta - tau, xc, scale)
            return torch.add(tau, d + d.abs(), alpha=0.5).to(x.dtype)

    def _forward_framework(self, x: Tensor) -> Tensor:
        """The term-by-term path of :class:`DivisiveNorm` and the TLU, for the framework's
        settings FRN itself never sets (``l1 > 0``, ``alpha``, ``power``)."""
        y = super().forward(x)
        if self.tau is None:
            return y
        return torch.maximum(y, self.tau.to(y.dtype).view((1, -1) + (1,) * (y.ndim - 2)))

    def extra_repr(self) -> str:
        eps = f"learned (now {self.raw_eps.abs().item():.4g})" if self.learn_eps else self.eps
        return f"{self.num_features}, eps={eps}, tlu={self.tlu}"


class NonNegative:
    """CompressAI's non-negative reparametrization of a parameter (its NonNegativeParametrizer,
    after Balle et al. 2016): the value is a reparameterized square with a pedestal and a
    lower bound::

        pedestal = offset^2,   bound = sqrt(minimum + pedestal)
        init(value) = sqrt(max(value + pedestal, pedestal))        the stored parameter p
        value(p)    = max(p, bound)^2 - pedestal                   >= minimum

    The lower bound's gradient passes where ``p >= bound`` or where the gradient step moves
    ``p`` up (gradient ``< 0``), and is zero otherwise. Values are computed in float32 or
    better (the pedestal, ``2^-36`` by default, underflows in half precision).
    """

    def __init__(self, minimum: float = 0.0, offset: float = 2**-18) -> None:
        for name, value in (("minimum", minimum), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.minimum = float(minimum)
        self.offset = float(offset)
        self.pedestal = self.offset**2
        self.bound = math.sqrt(self.minimum + self.pedestal)

    def init(self, value: Tensor) -> Tensor:
        """The stored parameter for ``value`` (values below ``minimum`` are raised to it)."""
        return torch.sqrt(torch.clamp_min(value + self.pedestal, self.pedestal))

    def __call__(self, raw: Tensor) -> Tensor:
        if raw.dtype in (torch.float16, torch.bfloat16):
            raw = raw.float()
        return _LowerBound.apply(raw, self.bound).square() - self.pedestal

    def __repr__(self) -> str:
        return f"NonNegative(minimum={self.minimum}, offset={self.offset})"


class _LowerBound(torch.autograd.Function):
    """``max(p, bound)``; gradient passed where ``p >= bound`` or the gradient is negative
    (``setup_context`` and a generated vmap rule: it runs under ``torch.func`` transforms)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(raw: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        return torch.clamp_min(raw, bound)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        raw, bound = inputs
        ctx.save_for_backward(raw)
        ctx.bound = bound

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (raw,) = ctx.saved_tensors
        passes = (raw >= ctx.bound) | (grad < 0)
        return grad * passes.to(grad.dtype), None


class GeneralizedDivisiveNorm(DivisiveNorm):
    """Generalized divisive normalization, GDN and its inverse IGDN (Balle, Laparra and
    Simoncelli, ICLR 2016), over the channels at each position (the ``"position"`` field)::

        gdn:  y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)
        igdn: y_i = x_i * sqrt(beta_i + sum_j gamma_ij x_j^2)

    ``beta`` ``(C,)`` (init 1, kept ``>= beta_min``) and ``gamma`` ``(C, C)`` (init
    ``gamma_init`` times the identity, kept ``>= 0``) are learned through
    :class:`NonNegative`, as CompressAI's ``GDN`` does; the stored parameters are
    ``raw_beta`` and ``raw_gamma``.

    Args:
        num_features: ``C``.
        inverse: IGDN (multiply instead of divide).
        beta_min: lower bound of ``beta``, ``>= 0``.
        gamma_init: the diagonal of ``gamma`` at init, ``>= 0``.
        reparam_offset: the parametrization's offset (its pedestal is its square).
    """

    _own_floor = True  # (beta >= beta_min, not sigma^2 + eps)

    def __init__(
        self,
        num_features: int,
        *,
        inverse: bool = False,
        beta_min: float = 1e-6,
        gamma_init: float = 0.1,
        reparam_offset: float = 2**-18,
    ) -> None:
        super().__init__(num_features, None, "position", sigma=0.0, eps=0.0)
        if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
            raise TypeError(f"gamma_init must be a number, got {gamma_init!r}")
        if not math.isfinite(gamma_init) or gamma_init < 0:
            raise ValueError(f"gamma_init must be a finite number >= 0, got {gamma_init}")
        self.inverse = bool(inverse)
        self.beta_param = NonNegative(beta_min, reparam_offset)
        self.gamma_param = NonNegative(0.0, reparam_offset)
        self.raw_beta = nn.Parameter(self.beta_param.init(torch.ones(num_features)))
        self.raw_gamma = nn.Parameter(
            self.gamma_param.init(float(gamma_init) * torch.eye(num_features))
        )

    @property
    def beta(self) -> Tensor:
        """``(C,)``, ``>= beta_min``."""
        return self.beta_param(self.raw_beta)

    @property
    def gamma(self) -> Tensor:
        """``(C, C)``, ``>= 0``: ``gamma[i, j]`` weighs ``x_j^2`` in the divisor of ``x_i``."""
        return self.gamma_param(self.raw_gamma)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return generalized_divisive_norm(x, self.beta, self.gamma, self.inverse)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, inverse={self.inverse}, beta_min={self.beta_param.minimum}, "
            f"reparam_offset={self.beta_param.offset}"
        )


class LocalContrastNorm(DivisiveNorm):
    """Local contrast normalization, as Torch7's ``nn.SpatialContrastiveNormalization`` with
    its uniform kernel: subtract the mean over a local window of all channels (the ``"local"``
    field, ``"valid"`` at the border), then divide by the local standard deviation over the
    same window, thresholded (see :func:`~lit_divnorm.norm.functional.local_contrast_norm`
    for the formula and Torch7's border coefficient). No learned parameters.

    Args:
        num_features: ``C``.
        window: the window, odd (Torch7's default kernel is 9 x 9); an int or one per
            positional dimension.
        threshold, thresval: a standard deviation ``<= threshold`` is replaced by
            ``thresval`` (Torch7's ``nn.Threshold``; both ``1e-4`` there), both ``> 0``.
        mean_floor: divide by ``max(s, mean over positions of s)`` instead (Jarrett et al.,
            ICCV 2009); Torch7 does not.
    """

    _own_floor = True  # (the threshold, not sigma^2 + eps)

    def __init__(
        self,
        num_features: int,
        *,
        window: Window = 9,
        threshold: float = 1e-4,
        thresval: float = 1e-4,
        mean_floor: bool = False,
    ) -> None:
        check_contrast_settings(window, threshold, thresval)
        super().__init__(num_features, "local", "local", sigma=0.0, eps=0.0, window=window)
        self.threshold = float(threshold)
        self.thresval = float(thresval)
        self.mean_floor = bool(mean_floor)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        window = self.sum_field.window
        return local_contrast_norm(x, window, self.threshold, self.thresval, self.mean_floor)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, window={self.sum_field.window}, threshold={self.threshold}, "
            f"thresval={self.thresval}, mean_floor={self.mean_floor}"
        )
