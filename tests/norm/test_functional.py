"""divisive_norm against the loop-based reference of the paper's equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_divnorm.norm import PRESETS, Field, divisive_norm
from lit_divnorm.norm.kernels import box
from tests.norm.reference import RefField, ref_divisive_norm, ref_field_mean

SIGMA, EPS = 0.3, 1e-6


pytestmark = pytest.mark.usefixtures("native_or_torch")  # C++ kernel and PyTorch passes


def _check(x: torch.Tensor, sum_field, sup_field, ref_sum, ref_sup, border="valid", sigma=SIGMA):
    """Both the fused kernels and the term-by-term path equal the loop over the equations."""
    want = ref_divisive_norm(x.numpy(), ref_sum, ref_sup, sigma=sigma, eps=EPS, border=border)
    for fused in (True, False):
        got = divisive_norm(
            x, sum_field, sup_field, sigma=sigma, eps=EPS, border=border, fused=fused
        )
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize("window", [1, 2, 3, 4, 5, (3, 2), (1, 4)])
def test_2d_local_window_matches_loop(window, border):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    per_dim = window if isinstance(window, tuple) else (window, window)
    field = Field(channels="all", positions="window", window=window)
    ref = RefField(channels="all", positions="window", window=per_dim)
    _check(x, field, field, ref, ref, border)


@pytest.mark.parametrize("border", ["valid", "reference"])
def test_2d_different_sum_and_sup_windows_match_loop(border):
    """SR's DN* (sum 5x5, sup 7x7): the reference border divides the sup sum by 5x5."""
    x = torch.randn(1, 2, 8, 9, dtype=torch.float64)
    sum_field = Field(channels="all", positions="window", window=5)
    sup_field = Field(channels="all", positions="window", window=7)
    ref_sum = RefField(channels="all", positions="window", window=(5, 5))
    ref_sup = RefField(channels="all", positions="window", window=(7, 7))
    _check(x, sum_field, sup_field, ref_sum, ref_sup, border)


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize("window", [1, 3, 4, 7])
def test_1d_positional_window_matches_loop(window, border):
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    field = Field(channels="all", positions="window", window=window)
    ref = RefField(channels="all", positions="window", window=(window,))
    _check(x, field, field, ref, ref, border)


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize("window", [3, 6, 60])
def test_feature_vector_window_runs_over_features(window, border):
    """(N, C) hidden units: the RNN's DN windows over neighbouring units (60 > C too)."""
    x = torch.randn(3, 13, dtype=torch.float64)
    field = Field(channels="all", positions="window", window=window)
    ref = RefField(channels="self", positions="window", window=(window,))
    _check(x, field, field, ref, ref, border)


def test_even_window_has_tensorflow_same_placement():
    """Width 60 reaches 29 units left and 30 right, as TF SAME padding does."""
    x = torch.zeros(1, 100, dtype=torch.float64)
    x[0, 50] = 1.0
    field = Field(channels="all", positions="window", window=60)
    v = divisive_norm(x, field, None)
    # the spike is in the window of unit j iff j - 29 <= 50 <= j + 30, i.e. 20 <= j <= 79
    touched = (v[0] != 0).nonzero().flatten()
    assert touched.min().item() == 20 and touched.max().item() == 79


@pytest.mark.parametrize(
    "field, ref",
    [
        (Field(channels="window", channel_window=3), RefField(channels="window", channel_window=3)),
        (Field(channels="window", channel_window=4), RefField(channels="window", channel_window=4)),
        (
            Field(channels="groups", groups=2, positions="all"),
            RefField(channels="groups", positions="all", groups=2),
        ),
        (Field(channels="self", positions="all"), RefField(channels="self", positions="all")),
        (Field(channels="all", positions="all"), RefField(channels="all", positions="all")),
        (Field(batch=True, positions="all"), RefField(batch=True, positions="all")),
    ],
)
@pytest.mark.parametrize("border", ["valid", "reference"])
def test_channel_group_and_global_fields_match_loop(field, ref, border):
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _check(x, field, field, ref, ref, border)


def test_no_suppression_field_is_mean_subtraction_only():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    layer = Field(channels="all", positions="all")
    got = divisive_norm(x, layer, None)
    torch.testing.assert_close(got, x - x.mean(dim=(1, 2, 3), keepdim=True))


def test_no_summation_field_divides_without_centering():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    layer = Field(channels="all", positions="all")
    got = divisive_norm(x, None, layer, sigma=0.5, eps=0.0)
    want = x / torch.sqrt(0.25 + (x * x).mean(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(got, want)


def test_reference_border_equals_authors_zero_padded_box_filter():
    """The released code: channel mean, then conv with ones / (sum window area), SAME pad."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sum_w, sup_w, sigma = 5, 7, 1.0

    def tf_box(t, width, area):
        kernel = torch.ones(1, 1, width, width, dtype=t.dtype) / area
        left, right = (width - 1) // 2, width // 2
        return F.conv2d(F.pad(t, (left, right, left, right)), kernel)

    mean = tf_box(x.mean(dim=1, keepdim=True), sum_w, sum_w * sum_w)
    v = x - mean
    energy = tf_box((v * v).mean(dim=1, keepdim=True), sup_w, sum_w * sum_w)
    want = v / torch.sqrt(energy + sigma**2)
    sum_field = Field(channels="all", positions="window", window=sum_w)
    sup_field = Field(channels="all", positions="window", window=sup_w)
    got = divisive_norm(x, sum_field, sup_field, sigma=sigma, eps=0.0, border="reference")
    torch.testing.assert_close(got, want)


def test_window_larger_than_the_map_spans_everything():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    local = Field(channels="all", positions="window", window=15)
    layer = Field(channels="all", positions="all")
    torch.testing.assert_close(
        divisive_norm(x, local, local, sigma=0.5), divisive_norm(x, layer, layer, sigma=0.5)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_in_float32_without_overflow(dtype):
    x = torch.randn(2, 4, 6, 6) * 1e4  # v^2 ~ 1e8 overflows float16 (max 65504)
    field = Field(channels="all", positions="window", window=3)
    got = divisive_norm(x.to(dtype), field, field, sigma=0.5)
    want = divisive_norm(x.to(dtype).float(), field, field, sigma=0.5)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_gradcheck_with_learned_sigma_tensor():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    field = Field(channels="all", positions="window", window=3)
    assert torch.autograd.gradcheck(
        lambda a, s: divisive_norm(a, field, field, sigma=s), (x, sigma)
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"eps": -1.0}, "eps"),
        ({"border": "same"}, "border"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    field = Field(channels="all", positions="all")
    with pytest.raises(ValueError, match=match):
        divisive_norm(torch.randn(2, 3), field, field, **kwargs)


def test_bad_input_rank_and_dtype_raise():
    field = Field(channels="all", positions="all")
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        divisive_norm(torch.randn(5), field, field)
    with pytest.raises(TypeError, match="floating-point"):
        divisive_norm(torch.ones(2, 3, dtype=torch.long), field, field)


def test_window_tuple_must_match_positional_dims():
    field = Field(channels="all", positions="window", window=(3, 3))
    with pytest.raises(ValueError, match="window"):
        divisive_norm(torch.randn(2, 3, 7), field, field)


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize("windows", [(3, 3), (2, 5), (5, 7), (9, 4)])
def test_running_sum_box_means_beyond_the_matrix_limit(monkeypatch, windows, border):
    """Long axes use running sums instead of the cached box matrix: same values, same grads."""
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    sum_field = Field(channels="all", positions="window", window=windows[0])
    sup_field = Field(channels="all", positions="window", window=windows[1])
    ref_sum = RefField(channels="all", positions="window", window=(windows[0],) * 2)
    ref_sup = RefField(channels="all", positions="window", window=(windows[1],) * 2)
    monkeypatch.setattr(box, "MATRIX_MAX_LENGTH", 0)
    _check(x, sum_field, sup_field, ref_sum, ref_sup, border)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: divisive_norm(a, sum_field, sup_field, sigma=0.5, border=border), (x,)
    )


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize(
    "shape, windows", [((2, 3, 5, 6), (3, 5)), ((2, 3, 9), (4, 7)), ((3, 11), (6, 3))]
)
def test_fused_local_norm_gradients_match_the_direct_path(shape, windows, border):
    """The hand-written backward against autograd through the term-by-term equations."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    sum_field = Field(channels="all", positions="window", window=windows[0])
    sup_field = Field(channels="all", positions="window", window=windows[1])
    grad = torch.randn(shape, dtype=torch.float64)
    results = []
    for fused in (True, False):
        y = divisive_norm(
            x, sum_field, sup_field, sigma, 1e-3, border, weight=weight, bias=bias, fused=fused
        )
        results.append((y, *torch.autograd.grad(y, (x, sigma, weight, bias), grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda a, s: divisive_norm(a, sum_field, sup_field, s, 1e-3, border), (x, sigma)
    )


def test_direct_batch_path_equals_torch_batch_norm_with_running_stats():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    torch_mean, torch_var = mean.clone(), var.clone()
    batch = Field(batch=True, positions="all")
    for training in (True, True, False):
        got = divisive_norm(
            x, batch, batch, 0.0, 1e-5, running_mean=mean, running_var=var,
            training=training, momentum=0.1, fused=False,
        )  # fmt: skip
        want = F.batch_norm(x, torch_mean, torch_var, None, None, training, 0.1, 1e-5)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(mean, torch_mean)
        torch.testing.assert_close(var, torch_var)
        x = x * 2 + 1


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (3, 11)])
def test_fused_l1_term_and_its_gradient_match_the_direct_path(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    field = Field(channels="all", positions="window", window=3)
    grad = torch.randn(shape, dtype=torch.float64)
    results = []
    for fused in (True, False):
        y, l1 = divisive_norm(x, field, field, 0.5, return_l1=True, fused=fused)
        loss = (y * grad).sum() + 3.0 * l1
        results.append((y, l1, *torch.autograd.grad(loss, x)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    # mean|v| by hand: v = x - (channel mean, box-averaged over a 3-window)
    if len(shape) == 4:
        v = x - F.avg_pool2d(x.mean(1, keepdim=True), 3, 1, 1, count_include_pad=False)
        torch.testing.assert_close(results[0][1], v.abs().mean())


@pytest.mark.parametrize("backend", ["compile", "torch", "native", "auto"])
def test_every_backend_matches_the_loop(backend, native_or_torch):
    """Each backend of the local operator (forward, L1 term and gradient) against the float64
    loop over the equations and its finite-difference gradient."""
    if backend == "native" and native_or_torch == "torch":
        pytest.skip("the C++ kernels are switched off in this run")
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    sum_field = Field(channels="all", positions="window", window=3)
    sup_field = Field(channels="all", positions="window", window=(5, 2))
    y, l1 = divisive_norm(x, sum_field, sup_field, 0.5, EPS, return_l1=True, backend=backend)
    ref_sum = RefField(channels="all", positions="window", window=(3, 3))
    ref_sup = RefField(channels="all", positions="window", window=(5, 2))
    want = ref_divisive_norm(x.detach().numpy(), ref_sum, ref_sup, 0.5, EPS, "valid")
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-9, atol=1e-10)
    centred = x.detach().numpy() - ref_field_mean(x.detach().numpy(), ref_sum, "valid")
    np.testing.assert_allclose(l1.item(), np.abs(centred).mean(), rtol=1e-10)

    def f(t):
        out, penalty = divisive_norm(t, sum_field, sup_field, 0.5, EPS, return_l1=True,
                                     backend=backend)  # fmt: skip
        return out, penalty

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize(
    ("sum_field", "sup_field", "dims"),
    [
        (PRESETS["batch"], PRESETS["batch"], (0, 2, 3)),  # bn*, bn-l1
        (PRESETS["layer"], PRESETS["layer"], (1, 2, 3)),  # ln*, ln-l1
        (PRESETS["batch"], None, (0, 2, 3)),  # bnms with an L1 weight
        (PRESETS["layer"], None, (1, 2, 3)),  # lnms with an L1 weight
    ],
)
def test_l1_term_of_torch_kernel_fields_and_its_gradient(sum_field, sup_field, dims):
    """``mean|x - mean_A(x)|`` and its gradient (through the mean too) against the formula
    written out in float64, while the output comes from torch's kernels or the centring."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    bias = torch.randn(3, dtype=torch.float64)
    _, l1 = divisive_norm(x, sum_field, sup_field, 1.0, weight=weight, bias=bias, return_l1=True)
    want = (x - x.mean(dim=dims, keepdim=True)).abs().mean()
    torch.testing.assert_close(l1, want)
    (got_grad,) = torch.autograd.grad(l1, x)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("name", ["bnms", "lnms"])
def test_mean_subtraction_only_equals_the_formula(name):
    """bnms / lnms: ``gamma (x - mean) + beta`` by the one-pass centring, with gradients."""
    from lit_divnorm.norm import build_norm

    norm = build_norm(name, 3).double()
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    dims = (0, 2, 3) if name == "bnms" else (1, 2, 3)
    want = (x - x.mean(dim=dims, keepdim=True)) * norm.weight.view(1, -1, 1, 1)
    want = want + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), want)
    assert torch.autograd.gradcheck(norm, (x,))


@pytest.mark.parametrize("border", ["valid", "reference"])
def test_local_mean_subtraction_only_matches_the_loop_and_gradcheck(border):
    """dnms's fused path ``x - A(mean_c x)`` (hand-written backward) against the loop, its
    L1 term against the formula, and float64 gradcheck."""
    field = Field(channels="all", positions="window", window=(3, 2))
    ref = RefField(channels="all", positions="window", window=(3, 2))
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    y, l1 = divisive_norm(x, field, None, border=border, return_l1=True)
    want = ref_divisive_norm(x.detach().numpy(), ref, None, border=border)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(l1.item(), np.abs(want).mean(), rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t: divisive_norm(t, field, None, border=border, return_l1=True), (x,)
    )
