"""The Triton kernels (in Triton's interpreter on the CPU, on the GPU where there is one)
against the float64 loop over the paper's equations, and their gradients against autograd
through the float64 term-by-term equations (themselves checked against the loop and by
gradcheck in test_functional.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_divnorm.norm import Field, divisive_norm
from lit_divnorm.norm.kernels import triton as triton_kernels
from tests.norm.reference import RefField, ref_divisive_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not (triton_kernels.available() and (DEVICE == "cuda" or triton_kernels.interpreted())),
    reason="needs Triton, and a CUDA GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def _fields(sum_window, sup_window):
    """``(sum, sup)`` local fields over all channels, as Fields and as the loop's RefFields."""
    return [
        tuple(cls(channels="all", positions="window", window=w) for w in (sum_window, sup_window))
        for cls in (Field, RefField)
    ]


def _grads(x, sum_field, sup_field, sigma, border, backend, grad, fused=True):
    """``y``, ``l1`` and the gradients of ``(y * grad).sum() + 3 l1`` for ``x`` and ``sigma``."""
    y, l1 = divisive_norm(
        x, sum_field, sup_field, sigma, 1e-5, border, return_l1=True, backend=backend, fused=fused
    )
    grads = torch.autograd.grad((y * grad).sum() + 3 * l1, (x, sigma))
    return y, l1, *grads


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize(
    ("shape", "sum_window", "sup_window"),
    [
        ((2, 3, 6, 5), (3, 3), (3, 3)),  # odd windows
        ((2, 4, 5, 7), (2, 4), (4, 2)),  # even and unequal windows
        ((1, 2, 4, 3), (9, 1), (1, 7)),  # windows longer than the map
        ((3, 1, 10), (4,), (3,)),  # 1-D: the feature rows of the RNN cells
    ],
)
def test_local_dn_matches_the_loop_and_its_gradients(shape, sum_window, sup_window, border):
    (sum_field, sup_field), (ref_sum, ref_sup) = _fields(sum_window, sup_window)
    x64 = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    sigma64 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)  # a learned floor
    grad = torch.randn(shape, dtype=torch.float64)
    want = _grads(x64, sum_field, sup_field, sigma64, border, "torch", grad, fused=False)
    loop = ref_divisive_norm(x64.detach().numpy(), ref_sum, ref_sup, 0.4, 1e-5, border)
    np.testing.assert_allclose(want[0].detach().numpy(), loop, rtol=1e-10, atol=1e-12)

    x = x64.detach().float().to(DEVICE).requires_grad_()
    sigma = sigma64.detach().float().to(DEVICE).requires_grad_()
    got = _grads(x, sum_field, sup_field, sigma, border, "triton", grad.float().to(DEVICE))
    for name, a, b in zip(("y", "l1", "dL/dx", "dL/dsigma"), got, want, strict=True):
        torch.testing.assert_close(a.detach().cpu().double(), b.detach(), rtol=1e-4, atol=2e-5,
                                   msg=name)  # fmt: skip


def test_feature_vectors_go_through_the_1d_kernels():
    """``(N, C)`` features with a positional window: the C features are one row of positions."""
    field = Field(channels="all", positions="window", window=5)
    ref = RefField(channels="all", positions="window", window=(5,))
    x = torch.randn(4, 11)
    got = divisive_norm(x.to(DEVICE), field, field, 0.5, 1e-5, backend="triton")
    want = ref_divisive_norm(x.double().numpy(), ref, ref, 0.5, 1e-5, "valid")
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("border", ["valid", "reference"])
@pytest.mark.parametrize("width", [3, 4, 9])
def test_channel_window_field_matches_the_loop_and_its_gradients(width, border):
    """lrn's field (no summation, a window of channels): forward against the loop, gradients
    against autograd through the term-by-term equations in float64."""
    sup = Field(channels="window", positions="self", channel_window=width)
    ref = RefField(channels="window", positions="self", channel_window=width)
    x64 = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    sigma64 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x64)
    want = _grads(x64, None, sup, sigma64, border, "torch", grad, fused=False)
    loop = ref_divisive_norm(x64.detach().numpy(), None, ref, 0.8, 1e-5, border)
    np.testing.assert_allclose(want[0].detach().numpy(), loop, rtol=1e-10, atol=1e-12)
    x = x64.detach().float().to(DEVICE).requires_grad_()
    sigma = sigma64.detach().float().to(DEVICE).requires_grad_()
    got = _grads(x, None, sup, sigma, border, "triton", grad.float().to(DEVICE))
    for name, a, b in zip(("y", "l1", "dL/dx", "dL/dsigma"), got, want, strict=True):
        torch.testing.assert_close(a.detach().cpu().double(), b.detach(), rtol=1e-4, atol=2e-5,
                                   msg=name)  # fmt: skip


def test_large_mean_statistics_do_not_cancel():
    """``300 + N(0, 1)``: the channel moments are taken about a shift, as on the CPU."""
    field = Field(channels="all", positions="window", window=(3, 3))
    ref = RefField(channels="all", positions="window", window=(3, 3))
    x = 300 + torch.randn(2, 8, 5, 5)
    got = divisive_norm(x.to(DEVICE), field, field, 0.5, 1e-5, backend="triton").cpu()
    want = ref_divisive_norm(x.double().numpy(), ref, ref, 0.5, 1e-5, "valid")
    assert np.abs(got.double().numpy() - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter has no bfloat16 arithmetic")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_the_gpu(dtype):
    field = Field(channels="all", positions="window", window=(5, 5))
    ref = RefField(channels="all", positions="window", window=(5, 5))
    x = (40 + torch.randn(2, 16, 9, 9)).to(dtype)
    got = divisive_norm(x.cuda(), field, field, 0.5, 1e-5, backend="triton")
    assert got.dtype == dtype
    want = ref_divisive_norm(x.double().numpy(), ref, ref, 0.5, 1e-5, "valid")
    assert np.abs(got.cpu().double().numpy() - want).max() / np.abs(want).max() < 2**-7
