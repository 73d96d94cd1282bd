"""Recurrent layers: torch's own RNN/LSTM as reference, formula references per placement,
per-time-step batch statistics, and gradient checks in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_divnorm.models.rnn import LSTMLayer, RNNLayer, StepwiseNorm
from lit_divnorm.models.rnn_lm import RNNLanguageModel
from lit_divnorm.norm.sparsity import clear_sparsity, sparsity_penalty

EPS = 1e-5  # DivisiveNorm's default floor under the square root


# ---------------------------------------------------------------- unnormalized = torch's
def _copy_lstm_weights(ours: LSTMLayer, theirs: nn.LSTM, layer: int = 0) -> None:
    with torch.no_grad():
        ours.input_weight.copy_(getattr(theirs, f"weight_ih_l{layer}"))
        ours.hidden_weight.copy_(getattr(theirs, f"weight_hh_l{layer}"))
        ours.bias.copy_(getattr(theirs, f"bias_ih_l{layer}") + getattr(theirs, f"bias_hh_l{layer}"))


def test_lstm_without_norm_matches_torch_lstm() -> None:
    reference = nn.LSTM(5, 7)
    layer = LSTMLayer(5, 7, norm=None)
    _copy_lstm_weights(layer, reference)
    x = torch.randn(6, 3, 5)
    h0, c0 = torch.randn(3, 7), torch.randn(3, 7)
    expected, (h_ref, c_ref) = reference(x, (h0[None], c0[None]))
    out, (h, c) = layer(x, (h0, c0))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h, h_ref[0])
    torch.testing.assert_close(c, c_ref[0])


def test_stacked_language_model_matches_torch_lstm() -> None:
    model = RNNLanguageModel(11, cell="lstm", hidden_sizes=[6, 6], norm="none")
    reference = nn.LSTM(6, 6, num_layers=2)
    for index, layer in enumerate(model.layers):
        _copy_lstm_weights(layer, reference, index)
    tokens = torch.randint(0, 11, (4, 5))  # (N, T)
    logits, state = model(tokens)
    hidden, (h_n, c_n) = reference(model.embedding(tokens.t()))
    torch.testing.assert_close(logits, model.decoder(hidden).transpose(0, 1))
    torch.testing.assert_close(torch.stack([s[0] for s in state]), h_n)
    torch.testing.assert_close(torch.stack([s[1] for s in state]), c_n)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_without_norm_matches_torch_rnn(nonlinearity: str) -> None:
    reference = nn.RNN(5, 7, nonlinearity=nonlinearity)
    layer = RNNLayer(5, 7, nonlinearity=nonlinearity, norm="none")
    with torch.no_grad():
        layer.input_weight.copy_(reference.weight_ih_l0)
        layer.hidden_weight.copy_(reference.weight_hh_l0)
        layer.bias.copy_(reference.bias_ih_l0 + reference.bias_hh_l0)
    x, h0 = torch.randn(6, 3, 5), torch.randn(3, 7)
    expected, h_ref = reference(x, h0[None])
    out, h = layer(x, h0)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h, h_ref[0])


def test_language_model_init_follows_the_paper() -> None:
    model = RNNLanguageModel(50, cell="lstm", hidden_sizes=[8, 8], norm="ln")
    for name, parameter in model.named_parameters():
        if name.endswith("norm.norms.0.weight"):
            assert torch.equal(parameter, torch.ones_like(parameter)), name  # gamma 1
        elif name == "decoder.bias" or name.endswith("norms.0.bias"):
            assert torch.equal(parameter, torch.zeros_like(parameter)), name
        else:
            assert parameter.abs().max() <= 0.1 and parameter.std() > 0.03, name


# ---------------------------------------------------------------- placement
@pytest.mark.parametrize(
    ("norm", "lstm", "rnn"),
    [
        (None, "gates", "joint"),
        ("baseline-l1", "gates", "joint"),
        ("bn", "projections", "separate"),
        ({"name": "bn*", "sigma": 1.0}, "projections", "separate"),
        ("ln", "projections", "joint"),
        ({"name": "ln-l1", "affine": False}, "gates", "joint"),
        ("ln-s", "gates", "joint"),
        ("ln*", "gates", "joint"),
        ("dn", "gates", "joint"),
        ("dn*", "gates", "joint"),
    ],
)
def test_auto_placement_follows_the_paper(norm: object, lstm: str, rnn: str) -> None:
    assert LSTMLayer(4, 6, norm=norm).placement == lstm
    assert RNNLayer(4, 6, norm=norm).placement == rnn


def test_bad_placement_is_named() -> None:
    with pytest.raises(ValueError, match="placement"):
        LSTMLayer(4, 6, placement="joint")
    with pytest.raises(ValueError, match="nonlinearity"):
        RNNLayer(4, 6, nonlinearity="sigmoid")


# ---------------------------------------------------------------- formula references
def _layer_norm(x: Tensor, sigma: float, module: nn.Module | None = None) -> Tensor:
    weight = None if module is None else module.weight
    bias = None if module is None else module.bias
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps=sigma**2 + EPS)


def _divisive_norm_loop(x: Tensor, window: int, sigma: float) -> Tensor:
    """1-D DN over the features of (N, H) by explicit loops (TF SAME window, valid border)."""
    _n, h = x.shape
    bounds = [(max(0, j - (window - 1) // 2), min(h, j + window // 2 + 1)) for j in range(h)]
    v = torch.stack([x[:, j] - x[:, lo:hi].mean(1) for j, (lo, hi) in enumerate(bounds)], 1)
    energy = torch.stack([(v[:, lo:hi] ** 2).mean(1) for lo, hi in bounds], 1)
    return v / torch.sqrt(sigma**2 + EPS + energy)


def _gates(layer: LSTMLayer | RNNLayer, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    return x @ layer.input_weight.t(), h @ layer.hidden_weight.t()


def test_lstm_layer_norm_projections_match_formula() -> None:
    layer = LSTMLayer(5, 6, norm={"name": "ln", "sigma": 0.01})
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.5, 1.5)  # gamma, beta away from 1, 0
    x = torch.randn(4, 3, 5)
    out, (_h_out, c_out) = layer(x)
    h, c = torch.zeros(3, 6), torch.zeros(3, 6)
    for t in range(4):
        wx, wh = _gates(layer, x[t], h)
        z = (
            _layer_norm(wx, 0.01, layer.input_norm.first)
            + _layer_norm(wh, 0.01, layer.hidden_norm.first)
            + layer.bias
        )
        i, f, g, o = z.chunk(4, 1)
        c = _layer_norm(f.sigmoid() * c + i.sigmoid() * g.tanh(), 0.01, layer.cell_norm.first)
        h = o.sigmoid() * c.tanh()
        torch.testing.assert_close(out[t], h)
    torch.testing.assert_close(c_out, c)  # the normalized cell is carried


@pytest.mark.parametrize("norm", ["ln-s", "dn"])
def test_lstm_per_gate_norms_match_formula(norm: str) -> None:
    sigma, window = 1.0, 3
    layer = LSTMLayer(5, 6, norm={"name": norm, "sigma": sigma}, layer_window=window)

    def reference_norm(z: Tensor) -> Tensor:
        return _layer_norm(z, sigma) if norm == "ln-s" else _divisive_norm_loop(z, window, sigma)

    x = torch.randn(4, 3, 5)
    out, (_, c_out) = layer(x)
    h, c = torch.zeros(3, 6), torch.zeros(3, 6)
    for t in range(4):
        wx, wh = _gates(layer, x[t], h)
        i, f, g, o = (reference_norm(z) for z in (wx + wh + layer.bias).chunk(4, 1))
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * reference_norm(c).tanh()
        torch.testing.assert_close(out[t], h)
    torch.testing.assert_close(c_out, c)  # the unnormalized cell is carried


def test_rnn_batch_norm_separate_projections_match_formula() -> None:
    layer = RNNLayer(5, 6, nonlinearity="relu", norm={"name": "bn", "sigma": 0.01}, time_steps=2)
    x = torch.randn(4, 8, 5)
    out, _ = layer(x)
    h = torch.zeros(8, 6)
    running = {name: (torch.zeros(6), torch.ones(6)) for name in ("x0", "x1", "h0", "h1")}
    for t in range(4):
        wx, wh = _gates(layer, x[t], h)
        step = min(t, 1)  # steps from time_steps on reuse the last statistics
        parts = []
        for key, z, slot in (("x", wx, layer.input_norm), ("h", wh, layer.hidden_norm)):
            mean, var = running[f"{key}{step}"]
            gamma, beta = slot.first.weight, slot.first.bias
            parts.append(F.batch_norm(z, mean, var, gamma, beta, True, 0.1, 0.01**2 + EPS))
        h = torch.relu(parts[0] + parts[1] + layer.bias)
        torch.testing.assert_close(out[t], h)
    for key, slot in (("x", layer.input_norm), ("h", layer.hidden_norm)):
        for step in range(2):
            mean, var = running[f"{key}{step}"]
            torch.testing.assert_close(slot.norms[step].running_mean, mean)
            torch.testing.assert_close(slot.norms[step].running_var, var)


def test_rnn_layer_norm_on_joint_preactivation_matches_formula() -> None:
    layer = RNNLayer(5, 6, nonlinearity="tanh", norm={"name": "ln", "sigma": 0.01})
    x = torch.randn(3, 2, 5)
    out, _ = layer(x)
    h = torch.zeros(2, 6)
    for t in range(3):
        wx, wh = _gates(layer, x[t], h)
        h = torch.tanh(_layer_norm(wx + wh + layer.bias, 0.01, layer.norm.first))
        torch.testing.assert_close(out[t], h)


# ---------------------------------------------------------------- per-time-step statistics
def test_stepwise_batch_norm_shares_parameters_not_statistics() -> None:
    slot = StepwiseNorm("bn", 4, time_steps=3)
    assert slot.per_step and len(slot.norms) == 3
    assert all(n.weight is slot.first.weight and n.bias is slot.first.bias for n in slot.norms)
    assert len(list(slot.parameters())) == 2
    for step in range(5):
        slot(torch.randn(16, 4) * (step + 1) + step, step)
    means = torch.stack([n.running_mean for n in slot.norms])
    assert means[0, 0] < means[1, 0] < means[2, 0]  # each step saw its own inputs
    slot.eval()
    x = torch.randn(2, 4)
    torch.testing.assert_close(slot(x, 7), slot.norms[2](x))  # later steps: the last stats
    assert len(StepwiseNorm("ln", 4, time_steps=3).norms) == 1


def test_stepwise_state_dict_round_trip() -> None:
    source = RNNLanguageModel(9, cell="tanh", hidden_sizes=[4], norm="bn", time_steps=2)
    source(torch.randint(0, 9, (3, 4)))
    target = RNNLanguageModel(9, cell="tanh", hidden_sizes=[4], norm="bn", time_steps=2)
    target.load_state_dict(source.state_dict())
    source.eval()
    target.eval()
    tokens = torch.randint(0, 9, (2, 5))
    torch.testing.assert_close(target(tokens)[0], source(tokens)[0])
    assert target.layers[0].input_norm.norms[1].weight is target.layers[0].input_norm.first.weight


# ---------------------------------------------------------------- sparsity and gradients
def test_l1_penalty_sums_one_term_per_slot_and_step() -> None:
    layer = RNNLayer(3, 5, norm={"name": "baseline-l1", "l1": 0.5})
    x = torch.randn(4, 2, 3)
    clear_sparsity(layer)
    _out, _ = layer(x)
    h, expected = torch.zeros(2, 5), 0.0
    for t in range(4):
        z = x[t] @ layer.input_weight.t() + h @ layer.hidden_weight.t() + layer.bias
        expected = expected + 0.5 * z.abs().mean()
        h = torch.tanh(z)
    torch.testing.assert_close(sparsity_penalty(layer), expected)


NORMS = ["bn", "bn*", "ln", "ln-s", "ln-l1", "ln*", "dn", "dn*", "baseline-l1"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("cell", ["lstm", "tanh", "relu"])
def test_normalized_cell_gradcheck_float64(norm: str, cell: str) -> None:
    if cell == "lstm":
        layer = LSTMLayer(3, 6, norm=norm, layer_window=3, time_steps=2)
    else:
        layer = RNNLayer(3, 6, nonlinearity=cell, norm=norm, layer_window=3, time_steps=2)
    layer = layer.double()
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def run(x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, ...]:
        state = (h0, c0) if cell == "lstm" else h0
        out, _ = layer(x, state)
        return out, sparsity_penalty(layer)

    assert torch.autograd.gradcheck(run, (x, h0, c0), eps=1e-6, atol=1e-5)
