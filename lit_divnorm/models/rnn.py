"""Recurrent layers (tanh RNN, ReLU RNN, LSTM) with registry norms placed as in the paper.

Where a norm sits (Ren et al., ICLR 2017; PAPER.md section 2; the authors' PTB code) depends on
the kind of norm, which the layers read off the built module when ``placement="auto"``:

* a norm whose statistics span the mini-batch (``bn``, ``bn-s``, ``bn-l1``, ``bn*``, ...)
  normalizes the input projection ``W_x x`` and the hidden projection ``W_h h`` separately,
  with statistics per time step and ``gamma, beta`` shared over time
  (``"separate"`` for an RNN, ``"projections"`` for an LSTM);
* in an LSTM, a norm with an affine ``gamma, beta`` (``ln``, ``ln-l1`` as registered) does the
  same without per-step statistics (``"projections"``: the 4 gates normalized jointly);
* every other norm (``ln-s``, ``ln*``, ``dn``, ``dn*``, ``baseline-l1``, ``none``, or any norm
  built with ``affine: false``) normalizes the joint pre-activation ``W_x x + W_h h + b``
  (``"joint"`` for an RNN; ``"gates"`` for an LSTM: each gate separately). The PTB configs
  build LN +L1 with ``affine: false``, as the authors' code does, so it lands here.

The rule matches the paper's split exactly (BN/LN with ``gamma, beta`` vs. LN-s/LN*/DN/DN*
without); pass ``placement`` explicitly to try another combination.

In an LSTM the cell is normalized before its ``tanh`` too; ``"projections"`` carries the
normalized cell, ``"gates"`` the unnormalized one, as the authors' code does::

    projections:  z = N_x(W_x x) + N_h(W_h h) + b;  c = N_c(f * c + i * g);  h = o * tanh(c)
    gates:        z = W_x x + W_h h + b;  i, f, g, o = sigma(N_i(z_i)), sigma(N_f(z_f)),
                  tanh(N_g(z_g)), sigma(N_o(z_o));  c = f * c + i * g;  h = o * tanh(N_c(c))

    separate (RNN): h = act(N_x(W_x x) + N_h(W_h h) + b)
    joint (RNN):    h = act(N(W_x x + W_h h + b))

A local (windowed) norm such as DN runs over the hidden units: ``layer_window`` (the paper: 30
for the LSTM, 60 for RNNs) is handed to :func:`build_norm`. Gates are ordered ``i, f, g, o`` as
in :class:`torch.nn.LSTM`. Shapes: inputs ``(T, N, input_size)``, outputs ``(T, N, hidden)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lit_divnorm.models.fused_rnn import (
    FeatureNormPlan,
    can_run_fused,
    feature_norm_plan,
    fused_lstm,
    fused_rnn,
)
from lit_divnorm.norm.layers import DivisiveNorm
from lit_divnorm.norm.registry import NormSpec, build_norm
from lit_divnorm.norm.sparsity import record_sparsity

Placement = Literal["auto", "separate", "joint", "projections", "gates"]
LSTMState = tuple[Tensor, Tensor]
RNN_PLACEMENTS = ("auto", "separate", "joint")
LSTM_PLACEMENTS = ("auto", "projections", "gates")


def spans_batch(norm: nn.Module) -> bool:
    """True when ``norm``'s statistics are taken over the mini-batch (batch normalization)."""
    if isinstance(norm, DivisiveNorm):
        return any(f is not None and f.batch for f in (norm.sum_field, norm.sup_field))
    return isinstance(norm, nn.modules.batchnorm._BatchNorm)


def has_affine(norm: nn.Module) -> bool:
    """True when ``norm`` learns a per-unit ``gamma, beta`` after normalizing."""
    return bool(getattr(norm, "affine", False) or getattr(norm, "elementwise_affine", False))


class StepwiseNorm(nn.Module):
    """One norm slot of a recurrent cell, called once per time step: ``norm(x, step)``.

    A norm that spans the batch gets ``time_steps`` copies with their own running statistics
    (per-time-step batch normalization) and shared parameters (``gamma``, ``beta``, a learned
    ``sigma``); steps from ``time_steps`` on reuse the last copy's statistics. Any other norm is
    one module used at every step. Shapes: ``x`` ``(N, num_features)`` -> same.
    """

    def __init__(
        self,
        spec: NormSpec,
        num_features: int,
        *,
        time_steps: int = 1,
        layer_window: int | None = None,
    ) -> None:
        super().__init__()
        _check_positive("time_steps", time_steps)
        first = build_norm(spec, num_features, layer_window=layer_window)
        self.per_step = spans_batch(first)
        norms = [first]
        if self.per_step:
            for _ in range(time_steps - 1):
                copy = build_norm(spec, num_features, layer_window=layer_window)
                _share_parameters(first, copy)
                norms.append(copy)
        self.norms = nn.ModuleList(norms)

    @property
    def first(self) -> nn.Module:
        return self.norms[0]

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        return self.norms[min(step, len(self.norms) - 1)](x)

    def extra_repr(self) -> str:
        return f"per_step={self.per_step}, time_steps={len(self.norms)}"


def _share_parameters(source: nn.Module, target: nn.Module) -> None:
    for name, parameter in list(source.named_parameters()):
        owner = target
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, leaf, parameter)


class RecurrentLayer(nn.Module):
    """Common part of the recurrent layers: weights, init and the loop over time."""

    def __init__(self, input_size: int, hidden_size: int, gates: int) -> None:
        super().__init__()
        _check_positive("input_size", input_size)
        _check_positive("hidden_size", hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.input_weight = nn.Parameter(torch.empty(gates * hidden_size, input_size))
        self.hidden_weight = nn.Parameter(torch.empty(gates * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(gates * hidden_size))
        self.reset_parameters()

    def reset_parameters(self, init_scale: float = 0.1) -> None:
        """Weights and bias uniform in ``[-init_scale, init_scale]`` (the paper: 0.1)."""
        for parameter in (self.input_weight, self.hidden_weight, self.bias):
            nn.init.uniform_(parameter, -init_scale, init_scale)

    def _check_inputs(self, inputs: Tensor) -> None:
        if inputs.ndim != 3 or inputs.shape[2] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects inputs (T, N, {self.input_size}), "
                f"got shape {tuple(inputs.shape)}"
            )


class RNNLayer(RecurrentLayer):
    """Vanilla RNN layer ``h_t = act(W_x x_t + W_h h_{t-1} + b)`` with a norm slot.

    Args:
        input_size, hidden_size: widths of ``x`` and ``h``.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        norm: registry spec (``None``/``"none"``: unnormalized).
        placement: ``"auto"``, ``"separate"`` or ``"joint"`` (see the module docstring).
        layer_window: window of a local norm over the hidden units (the paper: 60).
        time_steps: steps with their own batch statistics (per-time-step BN).
        fused: the fast path of :mod:`lit_divnorm.models.fused_rnn` where it applies
            (placement ``"joint"`` with a per-sample norm without learned parameters,
            float32/float64 outside autocast); ``False``: always the step-by-step loop.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        nonlinearity: Literal["tanh", "relu"] = "tanh",
        norm: NormSpec = None,
        placement: Placement = "auto",
        layer_window: int | None = 60,
        time_steps: int = 20,
        fused: bool = True,
    ) -> None:
        super().__init__(input_size, hidden_size, gates=1)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        if placement not in RNN_PLACEMENTS:
            raise ValueError(f"placement must be one of {RNN_PLACEMENTS}, got {placement!r}")
        self.nonlinearity = nonlinearity
        self.fused = fused
        self.activation = torch.tanh if nonlinearity == "tanh" else torch.relu

        def slot() -> StepwiseNorm:
            return StepwiseNorm(norm, hidden_size, time_steps=time_steps, layer_window=layer_window)

        first = slot()
        if placement == "auto":
            placement = "separate" if first.per_step else "joint"
        self.placement = placement
        if placement == "separate":
            self.input_norm, self.hidden_norm = first, slot()
        else:
            self.norm = first

    def initial_state(self, batch_size: int, like: Tensor) -> Tensor:
        return like.new_zeros(batch_size, self.hidden_size)

    def forward(self, inputs: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``inputs (T, N, input_size)``, ``state (N, H)`` -> outputs ``(T, N, H)``, last state."""
        self._check_inputs(inputs)
        h = self.initial_state(inputs.shape[1], inputs) if state is None else state
        plan = self._fused_plan(inputs)
        if plan is not None:
            projected = _project(inputs, self.input_weight, self.bias)
            outputs, h, l1 = fused_rnn(
                projected, h, self.hidden_weight, plan, self.nonlinearity == "relu"
            )
            if plan.l1 > 0:
                record_sparsity(self.norm.first, l1, 1.0)  # l1 >= 0: the summed terms
            return outputs, h
        projected = inputs @ self.input_weight.t()
        if self.placement == "joint":
            projected = projected + self.bias
        outputs = []
        for step, x in enumerate(projected):
            recurrent = h @ self.hidden_weight.t()
            if self.placement == "separate":
                z = self.input_norm(x, step) + self.hidden_norm(recurrent, step) + self.bias
            else:
                z = self.norm(x + recurrent, step)
            h = self.activation(z)
            outputs.append(h)
        return torch.stack(outputs), h

    def _fused_plan(self, inputs: Tensor) -> FeatureNormPlan | None:
        """The norm as a :class:`FeatureNormPlan`, or ``None`` for the step-by-step loop."""
        if not self.fused or self.placement != "joint" or not can_run_fused(inputs):
            return None
        return feature_norm_plan(self.norm.first, self.hidden_size, inputs.dtype, inputs.device)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, nonlinearity={self.nonlinearity}, "
            f"placement={self.placement}"
        )


class LSTMLayer(RecurrentLayer):
    """LSTM layer (gates ``i, f, g, o``, forget bias 0) with the paper's norm slots.

    Args:
        input_size, hidden_size: widths of ``x`` and ``h``.
        norm: registry spec (``None``/``"none"``: the plain LSTM of :class:`torch.nn.LSTM`).
        placement: ``"auto"``, ``"projections"`` or ``"gates"`` (see the module docstring).
        layer_window: window of a local norm over the hidden units (the paper: 30).
        time_steps: steps with their own batch statistics (per-time-step BN).
        fused: run the time loop as one autograd function with a hand-written backward
            (:mod:`lit_divnorm.models.fused_rnn`) where it applies: placement ``"gates"`` with
            per-sample norms without learned parameters, float32/float64 outside autocast.
            Same results as the step-by-step loop (``False``), several times faster.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        norm: NormSpec = None,
        placement: Placement = "auto",
        layer_window: int | None = 30,
        time_steps: int = 20,
        fused: bool = True,
    ) -> None:
        super().__init__(input_size, hidden_size, gates=4)
        if placement not in LSTM_PLACEMENTS:
            raise ValueError(f"placement must be one of {LSTM_PLACEMENTS}, got {placement!r}")

        def slot(width: int) -> StepwiseNorm:
            return StepwiseNorm(norm, width, time_steps=time_steps, layer_window=layer_window)

        cell_norm = slot(hidden_size)
        if placement == "auto":
            projections = cell_norm.per_step or has_affine(cell_norm.first)
            placement = "projections" if projections else "gates"
        self.placement = placement
        self.fused = fused
        self.cell_norm = cell_norm
        if placement == "projections":
            self.input_norm = slot(4 * hidden_size)
            self.hidden_norm = slot(4 * hidden_size)
        else:
            self.gate_norms = nn.ModuleList(slot(hidden_size) for _ in range(4))

    def initial_state(self, batch_size: int, like: Tensor) -> LSTMState:
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return zeros, zeros.clone()

    def forward(self, inputs: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """``inputs (T, N, input_size)``, ``(h, c)`` each ``(N, H)`` -> ``(T, N, H)``, state."""
        self._check_inputs(inputs)
        h, c = self.initial_state(inputs.shape[1], inputs) if state is None else state
        plans = self._fused_plans(inputs)
        if plans is not None:
            return self._forward_fused(inputs, h, c, *plans)
        projected = inputs @ self.input_weight.t()
        if self.placement == "gates":
            projected = projected + self.bias
        outputs = []
        for step, x in enumerate(projected):
            recurrent = h @ self.hidden_weight.t()
            if self.placement == "projections":
                z = self.input_norm(x, step) + self.hidden_norm(recurrent, step) + self.bias
                zi, zf, zg, zo = z.chunk(4, dim=1)
            else:
                parts = (x + recurrent).chunk(4, dim=1)
                zi, zf, zg, zo = (
                    norm(part, step) for norm, part in zip(self.gate_norms, parts, strict=True)
                )
            c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
            if self.placement == "projections":
                c = self.cell_norm(c, step)
                h = torch.sigmoid(zo) * torch.tanh(c)
            else:
                h = torch.sigmoid(zo) * torch.tanh(self.cell_norm(c, step))
            outputs.append(h)
        return torch.stack(outputs), (h, c)

    def _fused_plans(self, inputs: Tensor) -> tuple[FeatureNormPlan, FeatureNormPlan] | None:
        """The gate and cell norms as :class:`FeatureNormPlan`, or ``None`` for the loop."""
        if not self.fused or self.placement != "gates" or not can_run_fused(inputs):
            return None
        width, dtype, device = self.hidden_size, inputs.dtype, inputs.device
        slots = [*self.gate_norms, self.cell_norm]
        plans = [feature_norm_plan(s.first, width, dtype, device) for s in slots]
        if any(p is None for p in plans) or not all(p.same_as(plans[0]) for p in plans[1:4]):
            return None
        return plans[0], plans[4]

    def _forward_fused(
        self, inputs: Tensor, h: Tensor, c: Tensor, gate: FeatureNormPlan, cell: FeatureNormPlan
    ) -> tuple[Tensor, LSTMState]:
        projected = _project(inputs, self.input_weight, self.bias)
        outputs, h, c, l1 = fused_lstm(projected, h, c, self.hidden_weight, gate, cell)
        if gate.l1 > 0 or cell.l1 > 0:
            # one term for every slot and step: alpha * mean|v| summed (l1 >= 0, so |l1| = l1)
            owner = self.gate_norms[0].first if gate.l1 > 0 else self.cell_norm.first
            record_sparsity(owner, l1, 1.0)
        return outputs, (h, c)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, placement={self.placement}"


def _project(inputs: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``W_x x + b`` for every time step in one product: ``(T, N, in)`` -> ``(T, N, G H)``."""
    flat = torch.addmm(bias, inputs.reshape(-1, inputs.shape[2]), weight.t())
    return flat.view(inputs.shape[0], inputs.shape[1], -1)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
