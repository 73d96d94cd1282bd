"""Normalizers beyond the paper against independent references.

rmsnorm against ``torch.nn.RMSNorm``; lrn against ``torch.nn.LocalResponseNorm``; frn, gdn/igdn
and lcn against direct float64 loops written from their published definitions (the FRN paper's
equations, Balle et al.'s GDN with CompressAI's parametrization, Torch7's
``SpatialSubtractiveNormalization`` + ``SpatialDivisiveNormalization`` step by step).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_divnorm.norm import DivisiveNorm, build_norm, convert_norms
from lit_divnorm.norm.functional import divisive_norm, local_contrast_norm
from lit_divnorm.norm.other_norms import (
    FilterResponseNorm,
    GeneralizedDivisiveNorm,
    LocalContrastNorm,
    NonNegative,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
NEW_NAMES = ["rmsnorm", "frn", "gdn", "igdn", "lcn", "lrn-alexnet"]


def _positions(shape: tuple[int, ...]):
    return itertools.product(*(range(s) for s in shape))


# ---------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("shape", [(3, 6), (3, 6, 7), (2, 6, 4, 5)])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rmsnorm_equals_torch_rmsnorm_over_the_channels(shape, eps):
    """``torch.nn.RMSNorm(C)`` on the channels-last permutation: outputs and gradients."""
    overrides = {} if eps is None else {"eps": eps}
    ours = build_norm("rmsnorm", 6, **overrides).double()
    theirs = nn.RMSNorm(6, eps=1e-6 if eps is None else eps).double()
    assert ours.bias is None and ours.weight.shape == (6,)
    with torch.no_grad():
        weight = torch.rand(6, dtype=torch.float64) + 0.5
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    x = (2 * torch.randn(shape, dtype=torch.float64) + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, want = ours(x), theirs(x2.movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(y, want, **TIGHT)
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (want * probe).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TIGHT)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TIGHT)


# ---------------------------------------------------------------- lrn


LRN_CONSTANTS = [(5, 1e-4, 0.75, 2.0), (3, 0.5, 0.75, 1.0), (7, 2.0, 1.5, 0.5), (1, 1.0, 0.5, 1.0)]


@pytest.mark.parametrize(("size", "alpha", "beta", "k"), LRN_CONSTANTS)
@pytest.mark.parametrize("shape", [(2, 9, 7), (2, 9, 4, 5)])
def test_lrn_equals_torch_local_response_norm(size, alpha, beta, k, shape, native_or_torch):
    """The channel-window operator (C++ and eager) and the term-by-term path against
    ``torch.nn.LocalResponseNorm(size, alpha, beta, k)``: outputs and input gradients."""
    ours = build_norm(
        "lrn", 9, channel_window=size, alpha=alpha, power=beta, sigma=0.0, eps=k,
        border="reference",
    )  # fmt: skip
    theirs = nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)
    scale = 50.0 if alpha < 1e-2 else 1.0  # makes AlexNet's small alpha matter
    x = (scale * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, want = ours(x), theirs(x2)
    torch.testing.assert_close(y, want, **TIGHT)
    channel = ours.sup_field
    direct = divisive_norm(
        x.detach(), None, channel, 0.0, k, "reference", alpha=alpha, power=beta, fused=False
    )
    torch.testing.assert_close(direct, want.detach(), **TIGHT)
    probe = torch.randn_like(y)
    (y * probe).sum().backward()
    (want * probe).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TIGHT)


def test_lrn_alexnet_is_torch_lrn_with_alexnets_constants():
    norm = build_norm("lrn-alexnet", 16)
    x = 40 * torch.randn(2, 16, 5, 5, dtype=torch.float64)
    want = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(x)
    torch.testing.assert_close(norm(x), want, **TIGHT)
    assert (norm.alpha, norm.power, norm.border) == (1e-4, 0.75, "reference")


def test_default_lrn_is_unchanged():
    """lrn's defaults (configs use them): ``x / sqrt(1 + eps + mean of x^2 over the 5 channels
    inside the input)``, by a direct loop."""
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    want = torch.empty_like(x)
    for n, c, p in _positions(x.shape):
        members = [x[n, j, p] for j in range(c - 2, c + 3) if 0 <= j < 7]
        energy = sum(m * m for m in members) / len(members)
        want[n, c, p] = x[n, c, p] / torch.sqrt(1.0 + 1e-5 + energy)
    torch.testing.assert_close(build_norm("lrn", 7)(x), want, **TIGHT)


# ---------------------------------------------------------------- frn


def _frn_loop(x, gamma, beta, tau, eps):
    """Singh & Krishnan (2020), eq. 1-2 and the TLU, one channel of one sample at a time."""
    x = x.numpy()
    out = np.empty_like(x)
    for n, c in _positions(x.shape[:2]):
        values = x[n, c]
        nu2 = np.mean(values**2)
        y = gamma[c] * values / math.sqrt(nu2 + eps) + beta[c]
        out[n, c] = y if tau is None else np.maximum(y, tau[c])
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 5, 4, 6)])
@pytest.mark.parametrize("tlu", [True, False])
def test_frn_equals_the_direct_loop(shape, tlu):
    norm = build_norm("frn", 5, tlu=tlu).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if tlu:
            norm.tau.uniform_(-0.3, 0.3)
    x = torch.randn(shape, dtype=torch.float64) + 0.5
    params = [norm.weight, norm.bias, norm.tau if tlu else None]
    want = _frn_loop(x, *(None if p is None else p.detach().numpy() for p in params), 1e-6)
    y = norm(x)
    torch.testing.assert_close(y, want, **TIGHT)
    if tlu:  # the threshold is active somewhere
        assert (y == norm.tau.view(1, -1, *[1] * (x.ndim - 2))).any()


def test_frn_learned_eps_is_its_absolute_value_and_learns():
    norm = build_norm("frn", 3, eps=1e-2, learn_eps=True).double()
    with torch.no_grad():
        norm.raw_eps.fill_(-0.3)  # enters as |eps_l| = 0.3
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ones, zeros = np.ones(3), np.zeros(3)
    torch.testing.assert_close(norm(x), _frn_loop(x, ones, zeros, zeros, 0.3), **TIGHT)
    norm(x).square().sum().backward()
    assert norm.raw_eps.grad is not None and norm.raw_eps.grad != 0


def test_frn_with_a_small_map_and_a_constant_channel_is_finite():
    x = torch.zeros(2, 3, 1, 1)
    x[0, 0] = 5.0
    y = build_norm("frn", 3)(x)
    assert torch.isfinite(y).all()


def _frn_torch_loop(x, gamma, beta, tau, eps):
    """The FRN paper's equations one channel of one sample at a time in differentiable torch
    scalars (``(N, C)``: the one position), the TLU by ``torch.maximum``."""
    out = torch.empty_like(x)
    for n, c in _positions(x.shape[:2]):
        values = x[n, c]
        nu2 = (values * values).mean()
        y = gamma[c] * values / torch.sqrt(nu2 + eps) + beta[c]
        out[n, c] = y if tau is None else torch.maximum(y, tau[c])
    return out


FRN_SETTINGS = [
    ((3, 4), {}),
    ((2, 4, 7), {"tlu": False}),
    ((2, 4, 3, 5), {}),
    ((2, 4, 3, 5), {"learn_eps": True, "eps": 0.05}),
    ((2, 4, 1, 1), {"eps": 1e-3}),
]


@pytest.mark.parametrize(("shape", "overrides"), FRN_SETTINGS, ids=str)
def test_frn_forward_and_gradients_equal_the_loop(shape, overrides):
    """Outputs and the gradients of the input, gamma, beta, tau and a learned eps (entering
    as ``|eps_l|``, started negative) against the loop; with exact ties ``y == tau`` (zero
    inputs where beta == tau), where torch.maximum gives each side half the gradient."""
    torch.manual_seed(1)
    norm = build_norm("frn", 4, **overrides).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if norm.tau is not None:
            norm.tau.uniform_(-0.3, 0.3)
            norm.tau[0] = norm.bias[0]  # channel 0: ties where x == 0
        if norm.learn_eps:
            norm.raw_eps.neg_()
    x = torch.randn(shape, dtype=torch.float64) + 0.3
    x[:, 0].view(shape[0], -1)[:, ::2] = 0.0
    x.requires_grad_()
    params = [p for p in (norm.weight, norm.bias, norm.tau) if p is not None]
    if norm.learn_eps:
        params.append(norm.raw_eps)
    refs = [p.detach().clone().requires_grad_() for p in params]
    eps = refs[-1].abs() if norm.learn_eps else overrides.get("eps", 1e-6)
    x_ref = x.detach().clone().requires_grad_()
    tau = refs[2] if norm.tau is not None else None
    want = _frn_torch_loop(x_ref, refs[0], refs[1], tau, eps)
    y = norm(x)
    torch.testing.assert_close(y, want, **TIGHT)
    if norm.tau is not None:
        assert (y[:, 0] == norm.tau[0]).any()  # the ties are there
    probe = torch.randn_like(y)
    got = torch.autograd.grad((y * probe).sum(), [x, *params])
    expected = torch.autograd.grad((want * probe).sum(), [x_ref, *refs])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TIGHT)


# ---------------------------------------------------------------- gdn / igdn


def _gdn_loop(x, beta, gamma, inverse):
    """Balle et al. (2016): ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)`` (IGDN: times)."""
    x = x.numpy()
    out = np.empty_like(x)
    channels = x.shape[1]
    for n in range(x.shape[0]):
        for position in _positions(x.shape[2:]):
            for i in range(channels):
                total = beta[i]
                for j in range(channels):
                    total += gamma[i, j] * x[(n, j, *position)] ** 2
                factor = math.sqrt(total) if inverse else 1.0 / math.sqrt(total)
                out[(n, i, *position)] = x[(n, i, *position)] * factor
    return torch.from_numpy(out)


@pytest.mark.parametrize("name", ["gdn", "igdn"])
@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5), (2, 4, 3, 3)])
def test_gdn_equals_the_direct_loop_with_learned_parameters(name, shape):
    norm = build_norm(name, 4).double()
    with torch.no_grad():
        norm.raw_beta.uniform_(0.5, 1.5)
        norm.raw_gamma.uniform_(0.0, 0.7)
    beta, gamma = norm.beta.detach().numpy(), norm.gamma.detach().numpy()
    assert not np.allclose(gamma, np.diag(np.diag(gamma)))  # cross-channel terms matter
    x = 2 * torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(norm(x), _gdn_loop(x, beta, gamma, name == "igdn"), **TIGHT)


def _gdn_torch_loop(x, raw_beta, raw_gamma, inverse, beta_min, offset=2**-18):
    """Balle et al.'s sum, channel by channel and position by position in differentiable
    torch scalars, of CompressAI's ``max(p, bound)^2 - pedestal`` (parameters above their
    bounds, where its gradient is clamp's)."""
    pedestal = offset**2
    beta = torch.clamp(raw_beta, min=math.sqrt(beta_min + pedestal)) ** 2 - pedestal
    gamma = torch.clamp(raw_gamma, min=offset) ** 2 - pedestal
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    out = torch.empty_like(flat)
    channels = x.shape[1]
    for n, p, i in _positions((flat.shape[0], flat.shape[2], channels)):
        total = beta[i]
        for j in range(channels):
            total = total + gamma[i, j] * flat[n, j, p] ** 2
        out[n, i, p] = flat[n, i, p] * (torch.sqrt(total) if inverse else 1 / torch.sqrt(total))
    return out.reshape(x.shape)


@pytest.mark.parametrize("name", ["gdn", "igdn"])
@pytest.mark.parametrize(
    ("shape", "beta_min"), [((3, 4), 1e-6), ((2, 4, 5), 0.2), ((2, 4, 3, 2), 1e-6)]
)
def test_gdn_forward_and_gradients_equal_the_loop(name, shape, beta_min):
    """Outputs and the gradients of the input, ``raw_beta`` and ``raw_gamma`` against the
    loop, with cross-channel weights."""
    torch.manual_seed(2)
    norm = build_norm(name, 4, beta_min=beta_min).double()
    with torch.no_grad():
        norm.raw_beta.uniform_(0.6, 1.5)
        norm.raw_gamma.uniform_(0.05, 0.7)
    x = (2 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    params = [norm.raw_beta, norm.raw_gamma]
    refs = [p.detach().clone().requires_grad_() for p in params]
    y = norm(x)
    want = _gdn_torch_loop(x_ref, *refs, name == "igdn", beta_min)
    torch.testing.assert_close(y, want, **TIGHT)
    probe = torch.randn_like(y)
    got = torch.autograd.grad((y * probe).sum(), [x, *params])
    expected = torch.autograd.grad((want * probe).sum(), [x_ref, *refs])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TIGHT)


def test_gdn_starts_as_compressai_does():
    """beta = 1 and gamma = 0.1 I (up to the pedestal 2^-36 and the float32 of the stored
    parameters): ``x / sqrt(1 + 0.1 x^2)``."""
    init = {"rtol": 1e-6, "atol": 1e-9}
    norm = build_norm("gdn", 3).double()
    torch.testing.assert_close(norm.beta, torch.ones(3, dtype=torch.float64), **init)
    torch.testing.assert_close(norm.gamma, 0.1 * torch.eye(3, dtype=torch.float64), **init)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(norm(x), x / torch.sqrt(1 + 0.1 * x * x), **init)
    inverse = build_norm("igdn", 3).double()
    torch.testing.assert_close(inverse(x), x * torch.sqrt(1 + 0.1 * x * x), **init)


def test_non_negative_parametrization_follows_compressai():
    """value = max(p, sqrt(minimum + offset^2))^2 - offset^2; init = sqrt(max(v + ped, ped));
    the bound's gradient passes where p >= bound or where the step raises p."""
    offset, minimum = 2**-18, 1e-6
    param = NonNegative(minimum, offset)
    pedestal, bound = offset**2, math.sqrt(minimum + offset**2)
    values = torch.tensor([2.0, 0.3, 1e-7, 0.0, -1.0], dtype=torch.float64)
    raw = param.init(values)
    want_raw = torch.sqrt(torch.clamp(values + pedestal, min=pedestal))
    torch.testing.assert_close(raw, want_raw, **TIGHT)
    got = param(raw)
    want = torch.clamp(raw, min=bound) ** 2 - pedestal
    torch.testing.assert_close(got, want, **TIGHT)
    assert (got >= minimum - 1e-18).all()
    torch.testing.assert_close(got[:2], values[:2], **TIGHT)

    raw = torch.tensor([1.0, bound / 2, bound / 2], dtype=torch.float64, requires_grad=True)
    out = param(raw)
    (out * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)).sum().backward()
    # above the bound: d(p^2)/dp = 2p; below it, a positive gradient (step lowers p) is cut,
    # a negative one (step raises p) passes through max's identity branch: 2 * bound * (-1)
    torch.testing.assert_close(
        raw.grad, torch.tensor([2.0, 0.0, -2 * bound], dtype=torch.float64), **TIGHT
    )


def test_gdn_beta_stays_above_its_minimum_under_training():
    norm = build_norm("gdn", 3, beta_min=0.25)
    optimizer = torch.optim.SGD(norm.parameters(), lr=10.0)
    for _ in range(5):
        optimizer.zero_grad()
        (-norm(torch.randn(4, 3, 5))).abs().sum().backward()  # pushes beta down
        optimizer.step()
    assert (norm.beta >= 0.25 - 1e-7).all() and (norm.gamma >= 0).all()


# ---------------------------------------------------------------- lcn


def _torch7_lcn(x, kernel_size, threshold=1e-4, thresval=1e-4, mean_floor=False):
    """Torch7's SpatialContrastiveNormalization (nn/SpatialSubtractiveNormalization.lua and
    SpatialDivisiveNormalization.lua) with a ones kernel, step by step, in float64: the kernel
    divided by its sum times nInputPlane, zero padding of kernel // 2, sums over every plane,
    ``coef`` from an input of ones, ``v = x - localsums / coef``,
    ``s = sqrt(sum kernel * v^2) / coef``, ``nn.Threshold(threshold, thresval)``, ``v / s``.
    ``mean_floor``: ``s = max(s, mean of s over the positions)`` (Jarrett et al. 2009)."""
    x = x.numpy()
    n_samples, planes, height, width = x.shape
    kh, kw = kernel_size
    kernel = np.ones((kh, kw)) / (kh * kw * planes)

    def estimate(maps):  # (planes, H, W) -> (H, W): padded convolution summed over the planes
        out = np.zeros((height, width))
        for h, w in _positions((height, width)):
            for c, dh, dw in _positions((planes, kh, kw)):
                hh, ww = h + dh - kh // 2, w + dw - kw // 2
                if 0 <= hh < height and 0 <= ww < width:
                    out[h, w] += kernel[dh, dw] * maps[c, hh, ww]
        return out

    coef = estimate(np.ones((planes, height, width)))
    out = np.empty_like(x)
    for n in range(n_samples):
        v = x[n] - estimate(x[n]) / coef
        std = np.sqrt(estimate(v * v)) / coef
        if mean_floor:
            std = np.maximum(std, std.mean())
        std = np.where(std > threshold, std, thresval)
        out[n] = v / std
    return torch.from_numpy(out)


@pytest.mark.parametrize(("window", "kernel"), [(3, (3, 3)), (5, (5, 5)), ((3, 5), (3, 5))])
@pytest.mark.parametrize("mean_floor", [False, True])
def test_lcn_equals_torch7_step_by_step(window, kernel, mean_floor):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64) * 2 + 1
    norm = build_norm("lcn", 3, window=window, mean_floor=mean_floor)
    torch.testing.assert_close(norm(x), _torch7_lcn(x, kernel, mean_floor=mean_floor), **TIGHT)


def test_lcn_default_window_is_torch7s_nine():
    x = torch.randn(1, 2, 10, 11, dtype=torch.float64)
    norm = build_norm("lcn", 2)
    assert norm.sum_field.window == 9
    torch.testing.assert_close(norm(x), _torch7_lcn(x, (9, 9)), **TIGHT)


def test_lcn_threshold_and_a_constant_region():
    """Low-contrast rows (std <= threshold: divided by thresval), a constant block (v = 0 and
    s = 0: output 0, gradient finite, since sqrt is kept off 0) and a high-contrast corner."""
    x = torch.full((1, 2, 6, 6), 3.0, dtype=torch.float64)
    x[0, :, :2] += 1e-4 * torch.randn(2, 2, 6, dtype=torch.float64)
    x[0, :, 5, 5] = 4.0
    x.requires_grad_()
    norm = build_norm("lcn", 2, window=3, threshold=0.01, thresval=0.5)
    y = norm(x)
    torch.testing.assert_close(y, _torch7_lcn(x.detach(), (3, 3), 0.01, 0.5), **TIGHT)
    low = y[0, :, 0]
    assert (low != 0).all() and low.abs().max() < 1e-3  # v / 0.5, not v / std ~ +-1
    assert (y[0, :, 3:5, :4] == 0).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def _torch7_lcn_conv(x, kernel_size, threshold, thresval, mean_floor):
    """Torch7's SpatialContrastiveNormalization in its convolution form, differentiable:
    ``conv2d`` with the ones kernel over ``kernel_size * nInputPlane``, zero padded, divided by
    the coefficient (the same convolution of ones), the std's square root divided by it,
    ``nn.Threshold``; ``(N, C, L)`` as one row of positions."""
    if x.ndim == 3:
        y = _torch7_lcn_conv(x.unsqueeze(2), (1, kernel_size[-1]), threshold, thresval, mean_floor)
        return y.squeeze(2)
    kh, kw = kernel_size
    kernel = torch.ones(1, x.shape[1], kh, kw, dtype=x.dtype) / (kh * kw * x.shape[1])

    def conv(t):
        return torch.nn.functional.conv2d(t, kernel, padding=(kh // 2, kw // 2))

    coef = conv(torch.ones_like(x[:1]))
    v = x - conv(x) / coef
    std = torch.sqrt(conv(v * v)) / coef
    if mean_floor:
        std = torch.maximum(std, std.mean(dim=(2, 3), keepdim=True))
    return v / torch.where(std > threshold, std, thresval)


LCN_SETTINGS = [
    ((2, 3, 6, 7), {"window": 3}),
    ((2, 3, 4, 5), {"window": 7}),  # the window wider than the map: border everywhere
    ((1, 3, 5, 6), {"window": (3, 5), "mean_floor": True}),
    ((2, 3, 6, 6), {"window": 3, "threshold": 0.05, "thresval": 0.5}),
    ((2, 3, 9), {"window": 5, "threshold": 0.05, "thresval": 2.0}),
]


@pytest.mark.parametrize(("shape", "overrides"), LCN_SETTINGS, ids=str)
def test_lcn_forward_and_input_gradient_equal_torch7s_convolution_form(shape, overrides):
    """Outputs and input gradients against Torch7's convolution form, at borders, with a
    window wider than the map, ``mean_floor`` and thresholds that hold (a low-contrast band:
    divided by ``thresval``)."""
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    band = x[:, :, : shape[2] - 2]
    band.copy_(3.0 + 1e-3 * torch.randn_like(band))  # low contrast, away from the last rows
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    settings = {"threshold": 1e-4, "thresval": 1e-4, "mean_floor": False, **overrides}
    window = settings.pop("window")
    kernel = window if isinstance(window, tuple) else (window, window)
    y = build_norm("lcn", 3, window=window, **settings)(x)
    want = _torch7_lcn_conv(x_ref, kernel, **settings)
    torch.testing.assert_close(y, want, **TIGHT)
    if settings["threshold"] > 1e-3:  # the threshold holds somewhere, not everywhere
        probe_settings = {**settings, "thresval": 1e9}  # where it holds: v / 1e9, near 0
        held = _torch7_lcn_conv(x_ref.detach(), kernel, **probe_settings).abs() < 1e-7
        assert held.any() and not held.all()
    probe = torch.randn_like(y)
    (got,) = torch.autograd.grad((y * probe).sum(), x)
    (expected,) = torch.autograd.grad((want * probe).sum(), x_ref)
    scale = expected.abs().max().item()  # (the low-contrast band divides by a std ~1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * scale)


# ---------------------------------------------------------------- gradcheck, float64


GRADCHECK = [
    ("rmsnorm", {}),
    ("frn", {}),
    ("frn", {"learn_eps": True, "eps": 0.1}),
    ("gdn", {}),
    ("igdn", {}),
    ("lcn", {"window": 3}),
    ("lcn", {"window": 3, "mean_floor": True}),
    ("lrn-alexnet", {}),
    ("lrn", {"alpha": 0.7, "power": 1.3, "channel_window": 3, "border": "reference"}),
]


@pytest.mark.parametrize(("name", "overrides"), GRADCHECK, ids=str)
def test_gradcheck_in_float64(name, overrides):
    module = build_norm(name, 4, **overrides).double()
    with torch.no_grad():
        for param in module.parameters():  # off init (and off gdn's bound kink)
            param.add_(0.1 * torch.rand_like(param))
    x = (3 * torch.randn(2, 4, 3, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(module, (x,))
    names = [n for n, _ in module.named_parameters()]
    if names:

        def of_params(*values):
            return torch.func.functional_call(module, dict(zip(names, values)), (x.detach(),))

        values = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
        assert torch.autograd.gradcheck(of_params, values)


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", NEW_NAMES)
def test_under_bfloat16_autocast_the_statistics_are_float32(name):
    """A bfloat16 input under CPU autocast: output in bfloat16 within its rounding of the
    same layer in float64 (GDN's channel sum is not cast down by autocast)."""
    norm = build_norm(name, 8, layer_window=3)
    reference = build_norm(name, 8, layer_window=3).double()
    reference.load_state_dict(norm.state_dict())
    x = (torch.randn(2, 8, 5, 5) * 3 + 2).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    want = reference(x.double()).detach()
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 2**-7


# ---------------------------------------------------------------- convert_norms


class ConvAndTokens(nn.Module):
    """A conv block with BatchNorm2d and a token block with LayerNorm(C) on (N, L, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.bn(self.conv(x)))
        tokens = maps.flatten(2).transpose(1, 2)  # (N, H*W, C)
        return self.head(self.ln(self.proj(tokens)).mean(1))


EXPECTED_TYPES = {
    "rmsnorm": DivisiveNorm,
    "frn": FilterResponseNorm,
    "gdn": GeneralizedDivisiveNorm,
    "igdn": GeneralizedDivisiveNorm,
    "lcn": LocalContrastNorm,
    "lrn-alexnet": DivisiveNorm,
}


@pytest.mark.parametrize("name", NEW_NAMES)
def test_convert_norms_puts_each_in_a_model_that_then_trains_a_step(name):
    model = ConvAndTokens()
    convert_norms(model, name)
    assert isinstance(model.bn, EXPECTED_TYPES[name])
    assert isinstance(model.ln.norm, EXPECTED_TYPES[name])  # via the channels-last adapter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_converted_layers_compute_their_reference_on_the_real_layout():
    """rmsnorm in a LayerNorm(C)'s place equals torch's RMSNorm over the tokens' channels;
    gdn in a BatchNorm2d's place equals the GDN loop over the channels at each pixel."""
    model = ConvAndTokens().double()
    convert_norms(model, "rmsnorm")
    tokens = torch.randn(2, 5, 8, dtype=torch.float64)
    want = nn.RMSNorm(8, eps=1e-6).double()(tokens)
    torch.testing.assert_close(model.ln(tokens), want, **TIGHT)

    model = convert_norms(ConvAndTokens().double(), "gdn")
    maps = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    beta, gamma = model.bn.beta.detach().numpy(), model.bn.gamma.detach().numpy()
    torch.testing.assert_close(model.bn(maps), _gdn_loop(maps, beta, gamma, False), **TIGHT)


def test_converting_to_another_kind_carries_nothing():
    """frn in an InstanceNorm2d's place (both over each channel's positions, but FRN does not
    centre) keeps FRN's own eps; rmsnorm in a LayerNorm's place starts from gamma = 1."""
    source = nn.InstanceNorm2d(4, eps=1e-3, affine=True)
    with torch.no_grad():
        source.weight.fill_(3.0)
    frn = convert_norms(nn.Sequential(source), "frn")[0]
    assert frn.eps == 1e-6 and torch.equal(frn.weight, torch.ones(4))
    layer_norm = nn.LayerNorm(4, eps=1e-3)
    with torch.no_grad():
        layer_norm.weight.fill_(3.0)
    rms = convert_norms(nn.Sequential(layer_norm), "rmsnorm")[0].norm
    assert rms.eps == 1e-6 and torch.equal(rms.weight, torch.ones(4))


def test_torchvision_resnet18_converts_to_gdn_and_runs():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    conversions = convert_norms(model, "gdn", dry_run=True)
    assert len(conversions) == 20
    convert_norms(model, "gdn")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.bn1.raw_gamma.grad is not None


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: build_norm("lrn", 4, alpha=0.0), ValueError, r"alpha must be .*> 0, got 0.0"),
        (lambda: build_norm("lrn", 4, power=-1), ValueError, r"power must be .*> 0, got -1"),
        (lambda: build_norm("lrn", 4, power="3/4"), TypeError, r"power must be a number"),
        (lambda: build_norm("dn", 4, channel_window=3), ValueError, r"channel_window=3 .*'window'"),
        (lambda: build_norm("lcn", 4, window=4), ValueError, r"odd window.*window=4"),
        (lambda: build_norm("lcn", 4, threshold=0), ValueError, r"threshold must be .*> 0"),
        (lambda: build_norm("lcn", 4, thresval=-1.0), ValueError, r"thresval must be .*> 0"),
        (lambda: build_norm("frn", 4, eps=0.0, learn_eps=True), ValueError, r"learn_eps.*eps=0"),
        (lambda: build_norm("frn", 4, eps=-1.0), ValueError, r"eps must be .*>= 0.0, got -1.0"),
        (lambda: build_norm("gdn", 4, beta_min=-1.0), ValueError, r"minimum must be .*got -1"),
        (lambda: build_norm("gdn", 4, gamma_init=-0.1), ValueError, r"gamma_init .*got -0.1"),
        (lambda: build_norm("gdn", 4, window=3), ValueError, r"takes no argument.*'window'"),
        (lambda: build_norm("rmsnorm", 4)(torch.randn(2, 5)), ValueError, r"4 channels.*\(2, 5\)"),
        (lambda: build_norm("gdn", 4)(torch.randn(2, 5, 3)), ValueError, r"4 channels"),
        (lambda: local_contrast_norm(torch.randn(1, 2, 4, 4), (3, 2)), ValueError, r"odd"),
    ],
)
def test_bad_settings_and_inputs_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_models_layer_window_reaches_lcn_but_not_gdn_or_frn():
    """A model passes its per-layer window to every slot: lcn takes it, gdn/frn ignore it."""
    assert build_norm("lcn", 4, layer_window=5).sum_field.window == 5
    assert isinstance(build_norm("gdn", 4, layer_window=5), GeneralizedDivisiveNorm)
    assert isinstance(build_norm("frn", 4, layer_window=5), FilterResponseNorm)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_fullgraph_compile_matches_eager(name):
    """``torch.compile(fullgraph=True)`` traces through each (GDN's bound is an
    autograd.Function): outputs and input gradients equal eager's."""
    torch._dynamo.reset()
    norm = build_norm(name, 8, layer_window=3)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    y_eager = norm(x)
    (grad_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad, grad_eager)
    torch._dynamo.reset()
