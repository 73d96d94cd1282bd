"""The fused recurrent path (one autograd node per layer) against the step-by-step loop over
the norm modules: outputs, states, every gradient and the L1 penalty, for every norm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from lit_divnorm.models.rnn import LSTMLayer, RNNLayer
from lit_divnorm.norm.kernels import cpu
from lit_divnorm.norm.registry import list_norms
from lit_divnorm.norm.sparsity import sparsity_penalty

FUSABLE = ["none", "baseline-l1", "ln-s", "ln*", "dn", "dn*", "dnms", "lrn"]
FUSABLE_SPECS = [
    {"name": "dn*", "border": "reference", "sum_window": 3, "sup_window": 5},
    {"name": "ln-l1", "affine": False},
]
LOOP_ONLY = [n for n in list_norms() if n not in FUSABLE and n != "gn"] + [
    {"name": "gn", "groups": 2},
    {"name": "dn", "learn_sigma": True},  # a learned sigma: the loop
]
NORMS = [(n, True) for n in FUSABLE + FUSABLE_SPECS] + [(n, False) for n in LOOP_ONLY]


def _run(layer: LSTMLayer | RNNLayer, x: Tensor, h0: Tensor, c0: Tensor) -> dict[str, Tensor]:
    x, h0, c0 = (t.detach().clone().requires_grad_() for t in (x, h0, c0))
    if isinstance(layer, LSTMLayer):
        out, (h, c) = layer(x, (h0, c0))
    else:
        out, h = layer(x, h0)
        c = h0 * c0  # gives c0 a gradient on both paths
    penalty = sparsity_penalty(layer)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum() + (h * h).sum() + c.sum() + 3 * penalty
    loss.backward()
    result = {"out": out, "h": h, "c": c, "penalty": penalty}
    result |= {"grad_x": x.grad, "grad_h0": h0.grad, "grad_c0": c0.grad}
    result |= {f"grad_{n}": p.grad for n, p in layer.named_parameters()}
    result |= {f"buffer_{n}": b for n, b in layer.named_buffers()}
    return result


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("norm", "fast"), NORMS, ids=str)
@pytest.mark.parametrize("cell", ["lstm", "tanh", "relu"])
def test_fused_layer_equals_the_step_loop(
    cell: str, norm: object, fast: bool, training: bool, native_or_torch: str
) -> None:
    if cell == "lstm":
        fused = LSTMLayer(5, 6, norm=norm, layer_window=3, time_steps=2).double()
    else:
        fused = RNNLayer(5, 6, cell, norm=norm, layer_window=3, time_steps=2).double()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loop = copy.deepcopy(fused)
    loop.fused = False
    fused.train(training)
    loop.train(training)
    probe = torch.zeros(1, 1, 5, dtype=torch.float64)
    plan = fused._fused_plans(probe) if cell == "lstm" else fused._fused_plan(probe)
    assert (plan is not None) == fast
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    h0, c0 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    got, want = _run(fused, x, h0, c0), _run(loop, x, h0, c0)
    assert got.keys() == want.keys()
    for key in want:
        assert (got[key] is None) == (want[key] is None), key
        if want[key] is not None:
            torch.testing.assert_close(got[key], want[key], msg=key)


@pytest.mark.parametrize("norm", ["dn*", "ln*", "none"])
def test_float32_native_lstm_matches_the_step_loop(norm: str) -> None:
    """float32 at the PTB layer's proportions: the C++ steps (their polynomial exp) against
    the loop over torch's own sigmoid and tanh."""
    if not cpu.available():
        pytest.skip("the C++ kernels could not be built here")
    torch.manual_seed(0)
    fused = LSTMLayer(16, 40, norm=norm, layer_window=7)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.5 * torch.randn_like(p))
    loop = copy.deepcopy(fused)
    loop.fused = False
    assert fused._fused_plans(torch.zeros(1, 1, 16)) is not None
    x = 2 * torch.randn(6, 5, 16)
    h0, c0 = torch.randn(5, 40), torch.randn(5, 40)
    got, want = _run(fused, x, h0, c0), _run(loop, x, h0, c0)
    for key in want:
        if want[key] is not None:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def _box3(z: Tensor) -> Tensor:
    """Mean over a window of 3 features (valid border: 2 at the ends)."""
    padded = torch.nn.functional.pad(z, (1, 1))
    counts = torch.full((z.shape[1],), 3.0, dtype=z.dtype)
    counts[0] = counts[-1] = 2.0
    return (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / counts


@pytest.mark.parametrize("norm", ["ln*", "dn*", "baseline-l1"])
def test_fused_l1_penalty_is_one_term_per_gate_and_step(norm: str) -> None:
    """alpha * mean|v| for each gate slice (N, H) and the cell, at each step, summed."""
    layer = LSTMLayer(4, 6, norm=norm, layer_window=3).double()
    alpha = 0.01 if norm == "baseline-l1" else 0.005
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    out, _ = layer(x)
    penalty = sparsity_penalty(layer)

    def centered_and_normalized(z: Tensor) -> tuple[Tensor, Tensor]:
        if norm == "baseline-l1":
            return z, z
        mean = (lambda t: t.mean(1, keepdim=True)) if norm == "ln*" else _box3
        v = z - mean(z)
        return v, v / torch.sqrt(0.5**2 + 1e-5 + mean(v * v))

    h, c = torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64)
    expected = torch.zeros((), dtype=torch.float64)
    for t in range(3):
        z = x[t] @ layer.input_weight.t() + h @ layer.hidden_weight.t() + layer.bias
        gates = []
        for part in z.chunk(4, 1):
            v, y = centered_and_normalized(part)
            expected = expected + alpha * v.abs().mean()
            gates.append(y)
        i, f, g, o = gates
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        v, n = centered_and_normalized(c)
        expected = expected + alpha * v.abs().mean()
        h = o.sigmoid() * n.tanh()
        torch.testing.assert_close(out[t], h)
    torch.testing.assert_close(penalty, expected)


def test_half_precision_and_autocast_use_the_loop() -> None:
    layer = LSTMLayer(4, 6, norm="dn*")
    assert layer._fused_plans(torch.zeros(1, 1, 4)) is not None
    assert layer._fused_plans(torch.zeros(1, 1, 4, dtype=torch.bfloat16)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fused_plans(torch.zeros(1, 1, 4)) is None
        out, _ = layer(torch.randn(3, 2, 4))
    assert out.shape == (3, 2, 6)
