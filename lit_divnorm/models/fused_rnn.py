"""Fast recurrent layers: the whole time loop in one autograd function with a hand-written BPTT.

A norm whose statistics are taken within each sample (``none``, ``baseline-l1``, ``ln-s``,
``ln*``, ``dn``, ``dn*``, ``dnms``, ``lrn``: everything the paper puts on the joint
pre-activation) acts on a feature vector ``u`` of width ``H`` through two linear maps, the
summation mean ``S`` and the suppression mean ``Q`` (``H x H``; ``1/H`` everywhere for a layer
field, a band for a local window), which :func:`feature_norm_plan` reads off the module by
applying its own field means to the identity::

    v = u - u @ S          (no summation field: v = u)
    r = (v^2 @ Q + sigma^2 + eps)^(-1/2)      (no suppression field: r = 1)
    y = v * r
    L1 term = alpha * mean|v|  (per slot and time step, on the sample's (N, H) slice)

With these, one time step of an LSTM is a handful of tensor operations on all four gates at
once (the ``(N, 4H)`` pre-activation is viewed as ``(4N, H)``, one row per sample and gate),
and its backward is written out by hand; autograd sees one node per layer instead of dozens per
step. On the CPU (float32/float64, a C++ compiler at hand) everything of an LSTM step but the
product ``h W_h^T`` is one call into :mod:`lit_divnorm.norm.kernels.cpu` each way, and a local
window's means are running sums (``S``, ``Q`` kept as ``(before, after, divisor)``) instead of
the banded products. The layers in :mod:`lit_divnorm.models.rnn` use this path where it applies
and fall back to the step-by-step loop over the norm modules otherwise (norms spanning the
batch, learned ``sigma`` or ``gamma, beta``, ``check_finite``, half precision or autocast).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lit_divnorm.norm import ops  # (the C++ pieces go through the norms' operators)
from lit_divnorm.norm.fields import Field
from lit_divnorm.norm.functional import Border, field_mean, suppression_divisor
from lit_divnorm.norm.layers import DivisiveNorm

FAST_DTYPES = (torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureNormPlan:
    """A per-sample norm on ``(rows, H)`` feature vectors as linear maps (see module docstring).

    ``center``/``scale`` are ``(H, H)`` matrices ``S``/``Q`` (``mean = u @ S``), or ``None``
    for no centering / no division; ``center_uniform``/``scale_uniform`` mark a layer field,
    computed as a row mean instead of a product. ``center_box``/``scale_box`` are a local
    window's ``(before, after, divisor)`` (divisor 0: count the features inside), with which
    the C++ LSTM step takes the means by running sums. ``floor = sigma^2 + eps``; ``l1 = alpha``.
    """

    center: Tensor | None
    scale: Tensor | None
    center_uniform: bool
    scale_uniform: bool
    floor: float
    l1: float
    center_box: tuple[int, int, int] | None = None
    scale_box: tuple[int, int, int] | None = None

    def same_as(self, other: FeatureNormPlan) -> bool:
        """The same norm (the matrices are cached, so one config shares one tensor)."""
        return all(
            getattr(self, f.name) is getattr(other, f.name)
            if isinstance(getattr(self, f.name), Tensor)
            else getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(self)
        )

    def row_spec(self, which: str) -> tuple[int, int, int, int] | None:
        """``which`` (``"center"``/``"scale"``) as ``(mode, before, after, divisor)`` for the
        C++ LSTM step: mode 0 none, 1 a layer mean, 2 a window; ``None`` for another matrix."""
        if getattr(self, which) is None:
            return (0, 0, 0, 0)
        if getattr(self, f"{which}_uniform"):
            return (1, 0, 0, 0)
        box = getattr(self, f"{which}_box")
        return None if box is None else (2, *box)

    def mean(self, u: Tensor, which: str) -> Tensor:
        if getattr(self, f"{which}_uniform"):
            return u.mean(dim=-1, keepdim=True)
        box = getattr(self, f"{which}_box")
        if box is not None and ops.native_applies(u):
            return ops.box_rows(u, box)
        return u @ getattr(self, which)

    def mean_adjoint(self, g: Tensor, which: str) -> Tensor:
        if getattr(self, f"{which}_uniform"):
            return g.mean(dim=-1, keepdim=True)
        box = getattr(self, f"{which}_box")
        if box is not None and ops.native_applies(g):
            return ops.box_rows(g, box, adjoint=True)
        return g @ getattr(self, which).T

    def center_weight(self, weight: Tensor) -> Tensor:
        """``(I - S)^T W`` for a weight ``(..., H, K)`` producing the centred units: centring
        is linear, so it folds into the weight before it, ``(x W^T)(I - S) = x ((I - S)^T W)^T``
        (``S^T W`` as the means of ``W^T``'s rows)."""
        return weight - self.mean(weight.transpose(-1, -2), "center").transpose(-1, -2)

    def forward(
        self, u: Tensor, out_v: Tensor | None = None, out_r: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``u (rows, H)`` -> ``y``, ``v``, ``r`` (``None`` without a suppression field);
        ``v`` and ``r`` are written into ``out_v`` and ``out_r`` when given."""
        if self.center is not None:
            v = (
                torch.sub(u, self.mean(u, "center"), out=out_v)
                if out_v is not None
                else (u - self.mean(u, "center"))
            )
        elif out_v is not None:
            v = out_v.copy_(u)
        else:
            v = u
        y, r = self.scale_forward(v, out_r)
        return y, v, r

    def new_r_buffer(self, v: Tensor | None) -> Tensor | None:
        """An empty buffer for ``r`` of every step, ``v``'s shape (last dim 1 for a layer
        field); ``None`` without a suppression field."""
        if self.scale is None:
            return None
        return v.new_empty(*v.shape[:-1], 1 if self.scale_uniform else v.shape[-1])

    def scale_forward(self, v: Tensor, out_r: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Centred ``v (rows, H)`` -> ``y``, ``r`` (``None`` without a suppression field);
        ``r`` is written into ``out_r`` when given."""
        if self.scale is None:
            return v, None
        e = self.mean(v * v, "scale").add_(self.floor)
        r = torch.rsqrt(e, out=out_r) if out_r is not None else e.rsqrt_()
        return v * r, r

    def scale_backward(
        self, grad_y: Tensor, v: Tensor, r: Tensor | None, l1_coef: Tensor | None
    ) -> Tensor:
        """``dL/dv`` from ``dL/dy``; ``l1_coef`` is ``dL/d(sum|v|)`` of the L1 term."""
        grad_v = grad_y
        if r is not None:
            grad_e = grad_y * v * (-0.5 * r * r * r)
            grad_v = torch.addcmul(grad_y * r, v, self.mean_adjoint(grad_e, "scale"), value=2.0)
        if l1_coef is not None:
            grad_v = grad_v + l1_coef * v.sign()
        return grad_v

    def backward(self, grad_y: Tensor, v: Tensor, r: Tensor | None, l1_coef: Tensor | None):
        """``dL/du`` from ``dL/dy``; ``l1_coef`` is ``dL/d(sum|v|)`` of the L1 term."""
        grad_v = self.scale_backward(grad_y, v, r, l1_coef)
        if self.center is None:
            return grad_v
        return grad_v - self.mean_adjoint(grad_v, "center")


IDENTITY_PLAN = FeatureNormPlan(None, None, False, False, 0.0, 0.0)


@functools.lru_cache(maxsize=64)
def _field_matrix(
    field: Field,
    border: Border,
    divisor: tuple[int, ...] | None,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, bool]:
    """``(S, uniform)``: ``field_mean(u) = u @ S`` on ``(rows, width)`` (read off the identity)."""
    with torch.no_grad(), torch.inference_mode(False):
        eye = torch.eye(width, dtype=torch.float64)
        columns = field_mean(eye, field, border, divisor).expand(width, width)
        uniform = bool(torch.allclose(columns, torch.full_like(columns, 1.0 / width)))
        return columns.to(dtype=dtype, device=device).contiguous(), uniform


def feature_norm_plan(
    norm: nn.Module, width: int, dtype: torch.dtype, device: torch.device
) -> FeatureNormPlan | None:
    """The linear description of ``norm`` on ``(rows, width)`` inputs, or ``None`` when it has
    none (statistics over the batch, learned parameters, input checks, another module type)."""
    if type(norm) is nn.Identity or (isinstance(norm, nn.Identity) and not list(norm.parameters())):
        return IDENTITY_PLAN
    if type(norm) is not DivisiveNorm:
        return None
    fields = (norm.sum_field, norm.sup_field)
    if any(f is not None and f.batch for f in fields):
        return None
    if norm.learn_sigma or norm.affine or norm.check_finite or list(norm.parameters()):
        return None
    if norm.alpha != 1.0 or norm.power != 0.5:  # the plans divide by a square root
        return None
    center = scale = divisor = None
    center_uniform = scale_uniform = False
    if norm.sum_field is not None:
        center, center_uniform = _field_matrix(
            norm.sum_field, norm.border, None, width, dtype, device
        )
    if norm.sup_field is not None:
        divisor = suppression_divisor(norm.sum_field, norm.sup_field, norm.border, 0)
        scale, scale_uniform = _field_matrix(
            norm.sup_field, norm.border, divisor, width, dtype, device
        )
    floor = float(norm.fixed_sigma) ** 2 + norm.eps
    l1 = norm.l1 if norm.training else 0.0
    center_box = _field_box(norm.sum_field, norm.border, None)
    scale_box = _field_box(norm.sup_field, norm.border, divisor)
    return FeatureNormPlan(
        center, scale, center_uniform, scale_uniform, floor, l1, center_box, scale_box
    )


def _field_box(
    field: Field | None, border: Border, divisor: tuple[int, ...] | None
) -> tuple[int, int, int] | None:
    """``(before, after, divisor)`` of a window over the features (0: count those inside)."""
    if field is None or not field.is_local or field.channels not in ("self", "all"):
        return None
    (width,) = field.window_for(1)
    count = 0 if border == "valid" else (divisor[0] if divisor else width)
    return (width - 1) // 2, width // 2, count


def native_lstm_specs(
    projected: Tensor, gate_plan: FeatureNormPlan, cell_plan: FeatureNormPlan
) -> tuple[tuple[int, int, int, int], ...] | None:
    """The C++ step's field specs (gate suppression, cell summation, cell suppression), or
    ``None`` where it does not apply (not a float CPU tensor, no compiler, another field)."""
    if not ops.native_applies(projected):
        return None
    specs = (gate_plan.row_spec("scale"), cell_plan.row_spec("center"), cell_plan.row_spec("scale"))
    return None if any(spec is None for spec in specs) else specs


def can_run_fused(inputs: Tensor) -> bool:
    """The fused path runs in float32/float64 outside autocast and torch.compile (half inputs
    and compiled models use the loop over the norm modules)."""
    if torch.compiler.is_compiling():  # torch.compile traces the step loop over the norms
        return False
    return inputs.dtype in FAST_DTYPES and not torch.is_autocast_enabled(inputs.device.type)


class FusedLSTM(torch.autograd.Function):
    """An LSTM layer with per-gate and cell norms (placement ``"gates"``) over all time steps.

    ``projected (T, N, 4H) = W_x x + b``, ``h0, c0 (N, H)``, ``hidden_weight (4H, H)``::

        a_t = projected_t + h_{t-1} W_h^T;  z_t = G(a_t) per gate (rows of (4N, H))
        i, f, g, o = sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)
        c_t = f * c_{t-1} + i * g;  h_t = o * tanh(C(c_t))
        l1 = alpha_G / (N H) * sum_t sum|v_G| + alpha_C / (N H) * sum_t sum|v_C|

    Returns ``outputs (T, N, H)``, ``h_T``, ``c_T`` (the unnormalized cell) and ``l1`` (0-d).
    """

    @staticmethod
    def forward(ctx, projected, h0, c0, hidden_weight, gate_plan, cell_plan):  # type: ignore[override]
        steps, batch, four_h = projected.shape
        hidden = four_h // 4
        centered = gate_plan.center is not None
        if centered:  # fold the gates' centring into the inputs and weights, once
            flat = projected.reshape(-1, hidden)
            projected = (flat - gate_plan.mean(flat, "center")).view(projected.shape)
            gates = hidden_weight.view(4, hidden, hidden)
            hidden_weight = gate_plan.center_weight(gates).reshape(four_h, hidden)
        weight_t = hidden_weight.T
        acts = projected.new_empty(steps, batch, four_h)
        keep_gate_v = gate_plan.scale is not None or gate_plan.l1 > 0
        keep_cell_v = cell_plan.scale is not None or cell_plan.l1 > 0
        gate_v = projected.new_empty(steps, batch * 4, hidden) if keep_gate_v else None
        gate_r = gate_plan.new_r_buffer(gate_v)
        cells = projected.new_empty(steps + 1, batch, hidden)
        hs = projected.new_empty(steps + 1, batch, hidden)
        cell_v = projected.new_empty(steps, batch, hidden) if keep_cell_v else None
        cell_r = cell_plan.new_r_buffer(cell_v)
        tanh_n = projected.new_empty(steps, batch, hidden)
        cells[0], hs[0] = c0, h0
        specs = native_lstm_specs(projected, gate_plan, cell_plan)
        l1_sums = (ctypes.c_double * 2)()
        if specs is not None:  # each step's work after the product in one C++ call
            v = gate_v.view(steps, batch, four_h) if keep_gate_v else acts.new_empty(batch, four_h)
            buffers = {
                "v": v, "gate_r": gate_r, "acts": acts, "cells": cells, "cell_v": cell_v,
                "cell_r": cell_r, "tanh_n": tanh_n, "hs": hs,
            }  # fmt: skip
            floors = (gate_plan.floor, cell_plan.floor)
            step = ops.lstm_forward_steps(buffers, specs, floors, l1_sums)
            for t in range(steps):
                torch.addmm(projected[t], hs[t], weight_t, out=v[t] if keep_gate_v else v)
                step(t)
        g_slice = slice(2 * hidden, 3 * hidden)
        for t in range(steps if specs is None else 0):
            if keep_gate_v:  # written in place: no copies into the saved buffers
                v = gate_v[t]
                torch.addmm(projected[t], hs[t], weight_t, out=v.view(batch, four_h))
            else:
                v = torch.addmm(projected[t], hs[t], weight_t).view(batch * 4, hidden)
            z, _ = gate_plan.scale_forward(v, None if gate_r is None else gate_r[t])
            z = z.view(batch, four_h)
            act = acts[t]
            torch.sigmoid(z, out=act)
            torch.tanh(z[:, g_slice], out=act[:, g_slice])
            i, f, g, o = act.chunk(4, dim=1)
            c = torch.addcmul(f * cells[t], i, g, out=cells[t + 1])
            out_v = None if cell_v is None else cell_v[t]
            n, _, _ = cell_plan.forward(c, out_v, None if cell_r is None else cell_r[t])
            torch.tanh(n, out=tanh_n[t])
            torch.mul(o, tanh_n[t], out=hs[t + 1])
        l1 = projected.new_zeros(())
        per_slot = batch * hidden
        if specs is not None:  # the sums came out of the steps
            alphas = (gate_plan.l1 / per_slot, cell_plan.l1 / per_slot)
            l1 += sum(alpha * total for alpha, total in zip(alphas, l1_sums, strict=True))
        else:
            if gate_plan.l1 > 0:
                l1 = l1 + gate_v.abs().sum() * (gate_plan.l1 / per_slot)
            if cell_plan.l1 > 0:
                l1 = l1 + cell_v.abs().sum() * (cell_plan.l1 / per_slot)
        saved = (hidden_weight, acts, gate_v, gate_r, cells, hs, cell_v, cell_r, tanh_n)
        ctx.save_for_backward(*saved)
        ctx.plans = (gate_plan, cell_plan)
        ctx.centered = centered
        ctx.specs = specs
        outputs = hs[1:]
        return outputs.clone(), hs[steps].clone(), cells[steps].clone(), l1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h, grad_c, grad_l1):  # type: ignore[override]
        # hidden_weight here has the gates' centring folded in (see forward)
        hidden_weight, acts, gate_v, gate_r, cells, hs, cell_v, cell_r, tanh_n = ctx.saved_tensors
        gate_plan, cell_plan = ctx.plans
        steps, batch, four_h = acts.shape
        hidden = four_h // 4
        per_slot = batch * hidden
        gate_l1 = grad_l1 * (gate_plan.l1 / per_slot) if gate_plan.l1 > 0 else None
        cell_l1 = grad_l1 * (cell_plan.l1 / per_slot) if cell_plan.l1 > 0 else None
        grad_a = acts.new_empty(steps, batch, four_h)
        contiguous = torch.contiguous_format
        grad_h = grad_h.clone(memory_format=contiguous) if grad_h is not None else None
        grad_h = grad_h if grad_h is not None else acts.new_zeros(batch, hidden)
        grad_c = grad_c.clone(memory_format=contiguous) if grad_c is not None else None
        grad_c = grad_c if grad_c is not None else acts.new_zeros(batch, hidden)
        if ctx.specs is not None:  # each step's work besides the product in one C++ call
            grads = {
                "grad_h": grad_h,
                "grad_out": None if grad_out is None else grad_out.contiguous(),
                "grad_c": grad_c,
                "grad_v": grad_a,
            }
            saved = {
                "acts": acts, "cells": cells, "tanh_n": tanh_n, "gate_v": gate_v,
                "gate_r": gate_r, "cell_v": cell_v, "cell_r": cell_r,
            }  # fmt: skip
            l1_coefs = tuple(0.0 if coef is None else float(coef) for coef in (gate_l1, cell_l1))
            step = ops.lstm_backward_steps(grads, saved, ctx.specs, l1_coefs)
            for t in reversed(range(steps)):
                step(t)
                torch.mm(grad_a[t], hidden_weight, out=grad_h)
        g_slice = slice(2 * hidden, 3 * hidden)
        for t in reversed(range(steps if ctx.specs is None else 0)):
            if grad_out is not None:
                grad_h = grad_h + grad_out[t]
            act = acts[t]
            i, f, g, o = act.chunk(4, dim=1)
            tn = tanh_n[t]
            grad_o = grad_h * tn
            grad_n = grad_h * o * (1 - tn * tn)
            r = None if cell_r is None else cell_r[t]
            v = None if cell_v is None else cell_v[t]
            grad_c = grad_c + cell_plan.backward(grad_n, v, r, cell_l1)
            grad_act = torch.cat([grad_c * g, grad_c * cells[t], grad_c * i, grad_o], dim=1)
            slope = act * (1 - act)
            slope[:, g_slice] = 1 - g * g
            grad_z = (grad_act * slope).view(batch * 4, hidden)
            r = None if gate_r is None else gate_r[t]
            v = None if gate_v is None else gate_v[t]
            grad_v = gate_plan.scale_backward(grad_z, v, r, gate_l1).view(batch, four_h)
            grad_a[t] = grad_v
            grad_c = grad_c * f
            grad_h = grad_v @ hidden_weight
        grad_a, grad_weight = _projection_grads(grad_a, hs, gate_plan, ctx.centered)
        return grad_a, grad_h, grad_c, grad_weight, None, None


def _projection_grads(
    grad_a: Tensor, hs: Tensor, plan: FeatureNormPlan, centered: bool
) -> tuple[Tensor, Tensor]:
    """From ``dL/da`` of the (centring-folded) pre-activations ``(T, N, G H)`` and the
    states ``hs (T + 1, N, H)``: ``dL/d(projected)`` (the folded centring's adjoint applied
    for all steps at once) and ``dL/d(hidden_weight)``."""
    steps, batch, width = grad_a.shape
    hidden = hs.shape[2]
    if centered:
        flat = grad_a.view(-1, hidden)
        grad_a = (flat - plan.mean_adjoint(flat, "center")).view(grad_a.shape)
    flat = grad_a.view(steps * batch, width)
    return grad_a, flat.T @ hs[:steps].reshape(steps * batch, hidden)


def fused_lstm(
    projected: Tensor,
    h0: Tensor,
    c0: Tensor,
    hidden_weight: Tensor,
    gate_plan: FeatureNormPlan,
    cell_plan: FeatureNormPlan,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See :class:`FusedLSTM`: ``outputs (T, N, H)``, ``h_T``, ``c_T``, ``l1``."""
    return FusedLSTM.apply(projected, h0, c0, hidden_weight, gate_plan, cell_plan)


class FusedRNN(torch.autograd.Function):
    """A vanilla RNN layer with a norm on the joint pre-activation (placement ``"joint"``).

    ``projected (T, N, H) = W_x x + b``, ``h0 (N, H)``, ``hidden_weight (H, H)``::

        a_t = projected_t + h_{t-1} W_h^T;  h_t = act(G(a_t));  l1 = alpha / (N H) sum_t sum|v|

    Returns ``outputs (T, N, H)``, ``h_T`` and ``l1`` (0-d).
    """

    @staticmethod
    def forward(ctx, projected, h0, hidden_weight, plan, relu):  # type: ignore[override]
        steps, batch, hidden = projected.shape
        centered = plan.center is not None
        if centered:  # fold the centring into the inputs and weights, once
            flat = projected.reshape(-1, hidden)
            projected = (flat - plan.mean(flat, "center")).view(projected.shape)
            hidden_weight = plan.center_weight(hidden_weight)
        weight_t = hidden_weight.T
        keep_v = plan.scale is not None or plan.l1 > 0
        norm_v = projected.new_empty(steps, batch, hidden) if keep_v else None
        norm_r = plan.new_r_buffer(norm_v)
        hs = projected.new_empty(steps + 1, batch, hidden)
        hs[0] = h0
        for t in range(steps):
            v = (
                torch.addmm(projected[t], hs[t], weight_t, out=norm_v[t])
                if keep_v
                else (torch.addmm(projected[t], hs[t], weight_t))
            )
            z, _ = plan.scale_forward(v, None if norm_r is None else norm_r[t])
            if relu:
                torch.clamp(z, min=0.0, out=hs[t + 1])
            else:
                torch.tanh(z, out=hs[t + 1])
        l1 = projected.new_zeros(())
        if plan.l1 > 0:
            l1 = l1 + norm_v.abs().sum() * (plan.l1 / (batch * hidden))
        ctx.save_for_backward(hidden_weight, hs, norm_v, norm_r)
        ctx.plan, ctx.relu, ctx.centered = plan, relu, centered
        return hs[1:].clone(), hs[steps].clone(), l1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h, grad_l1):  # type: ignore[override]
        hidden_weight, hs, norm_v, norm_r = ctx.saved_tensors  # centring folded in
        plan, relu = ctx.plan, ctx.relu
        steps, batch, hidden = grad_out.shape
        l1_coef = grad_l1 * (plan.l1 / (batch * hidden)) if plan.l1 > 0 else None
        grad_a = grad_out.new_empty(steps, batch, hidden)
        grad_h = grad_h.clone()
        for t in reversed(range(steps)):
            grad_h = grad_h + grad_out[t]
            h = hs[t + 1]
            grad_z = grad_h * (h > 0) if relu else grad_h * (1 - h * h)
            v = None if norm_v is None else norm_v[t]
            r = None if norm_r is None else norm_r[t]
            grad_v = plan.scale_backward(grad_z, v, r, l1_coef)
            grad_a[t] = grad_v
            grad_h = grad_v @ hidden_weight
        grad_a, grad_weight = _projection_grads(grad_a, hs, plan, ctx.centered)
        return grad_a, grad_h, grad_weight, None, None


def fused_rnn(
    projected: Tensor, h0: Tensor, hidden_weight: Tensor, plan: FeatureNormPlan, relu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """See :class:`FusedRNN`: ``outputs (T, N, H)``, ``h_T``, ``l1``."""
    return FusedRNN.apply(projected, h0, hidden_weight, plan, relu)
