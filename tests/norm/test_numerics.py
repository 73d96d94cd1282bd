"""Numerics on every device: large means, autocast, half-precision models, backends.

References: the float64 loop over the paper's equations (:mod:`tests.norm.reference`) and
torch's own norms in float64.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_divnorm.norm import build_norm, list_norms
from lit_divnorm.norm.ops import BACKENDS
from tests.norm.reference import RefField, ref_divisive_norm

pytestmark = pytest.mark.usefixtures("native_or_torch")  # C++ kernels and the eager path

LOCAL = RefField(channels="all", positions="window", window=(3, 3))


def _relative_error(got: torch.Tensor, want: np.ndarray | torch.Tensor) -> float:
    want = torch.as_tensor(want, dtype=torch.float64)
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _reference(name: str, x: torch.Tensor) -> np.ndarray | torch.Tensor:
    """The float64 reference of registry norm ``name`` (defaults, training mode) at ``x``."""
    x64 = x.double()
    if name in ("dn", "dn*"):
        return ref_divisive_norm(x64.numpy(), LOCAL, LOCAL, 0.5, 1e-5, "valid")
    if name == "dn-reference":
        return ref_divisive_norm(x64.numpy(), LOCAL, LOCAL, 0.5, 1e-5, "reference")
    if name == "lrn":
        channel = RefField(channels="window", positions="self", channel_window=5)
        return ref_divisive_norm(x64.numpy(), None, channel, 1.0, 1e-5, "valid")
    if name == "bn":
        return F.batch_norm(x64, None, None, training=True, eps=1e-5)
    if name == "ln":
        return F.group_norm(x64, 1, eps=1e-5)
    if name == "gn":
        return F.group_norm(x64, 4, eps=1e-5)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["dn", "dn-reference", "bn", "ln", "gn", "lrn"])
def test_float32_input_with_a_mean_300x_its_spread(name):
    """float32 ``300 + N(0, 1)``: within 1e-4 of the float64 reference (no cancellation)."""
    x = 300 + torch.randn(2, 16, 6, 6)
    overrides = {"dn-reference": {"border": "reference"}, "gn": {"groups": 4}}.get(name, {})
    norm = build_norm(name.removesuffix("-reference"), 16, layer_window=3, **overrides)
    assert _relative_error(norm(x), _reference(name, x)) < 1e-4


def _large_mean_conv_output(dtype_context) -> torch.Tensor:
    """The output of a conv whose outputs have a mean near 40, under the given autocast."""
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    torch.nn.init.constant_(conv.bias, 40.0)
    with dtype_context():
        return conv(torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("name", ["dn", "dn*", "bn", "ln", "lrn"])
def test_under_cpu_bfloat16_autocast_after_a_large_mean_layer(name):
    """A bfloat16 conv output (mean ~40) normalized under autocast: statistics in float32, so
    the bfloat16 output is within its own rounding (2^-8) of the float64 reference."""
    with torch.no_grad():
        x = _large_mean_conv_output(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        assert x.dtype == torch.bfloat16
        norm = build_norm(name, 16, layer_window=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
    assert y.dtype == torch.bfloat16
    assert _relative_error(y, _reference(name, x)) < 2**-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dn", "dn*", "bn", "ln", "lrn"])
def test_under_cuda_autocast_after_a_large_mean_layer(name, dtype):
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).cuda()
    torch.nn.init.constant_(conv.bias, 40.0)
    norm = build_norm(name, 16, layer_window=3)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        x = conv(torch.randn(4, 3, 8, 8, device="cuda"))
        y = norm.cuda()(x)
    assert y.dtype == x.dtype == dtype
    assert _relative_error(y.cpu(), _reference(name, x.cpu())) < 2**-8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list_norms())
def test_every_registry_norm_in_a_half_precision_model(name, dtype):
    """``build_norm(name, C).to(dtype)``: train and eval forwards in ``dtype`` agree with the
    same layer in float64 to the half type's rounding, and the backward runs."""
    norm = build_norm(name, 32)
    reference = copy.deepcopy(norm).double()
    norm.to(dtype)
    x = torch.randn(4, 32, 6, 6) + 3.0
    tolerance = 4 * torch.finfo(dtype).eps
    for training in (True, False):
        norm.train(training)
        reference.train(training)
        xh = x.to(dtype).requires_grad_(training)
        y = norm(xh)
        assert y.dtype == dtype
        assert _relative_error(y.detach(), reference(xh.detach().double()).detach()) < tolerance
        if training:
            y.float().square().mean().backward()
            assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()


@pytest.mark.parametrize("name", ["dn", "dn*", "lrn", "bn"])
def test_an_unknown_backend_is_refused_with_the_allowed_values(name):
    with pytest.raises(ValueError, match=r"backend must be one of .*'auto'.*got 'cuda'"):
        build_norm(name, 8, backend="cuda")


def test_native_on_a_non_cpu_tensor_names_backend_and_device():
    norm = build_norm("dn", 8, backend="native")
    x = torch.randn(2, 8, 4, 4, device="meta")
    with pytest.raises(ValueError, match=r"backend='native'.*'meta'.*'auto', 'compile'"):
        norm(x)


def test_triton_where_it_cannot_run_names_backend_device_and_alternatives():
    norm = build_norm("dn", 8, backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run .* on 'meta'.*'auto'"):
        norm(torch.randn(2, 8, 4, 4, device="meta"))


def test_backends_list_is_the_documented_one():
    assert BACKENDS == ("auto", "native", "triton", "compile", "torch")


@pytest.mark.parametrize("with_l1", [False, True])
def test_local_operator_passes_torch_library_opcheck(with_l1):
    """Schema, fake kernel, autograd registration and the eager kernel agree (torch's own
    checker of custom operators)."""
    from lit_divnorm.norm import ops

    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    floor = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    args = (x, floor, [3, 3], [5, 2], None, "valid", with_l1, "auto")
    torch.library.opcheck(ops.local_dn, args)


def test_channel_operator_passes_torch_library_opcheck():
    from lit_divnorm.norm import ops

    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    floor = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.channel_dn, (x, floor, 3, "reference", 3, 0.5, 0.75, "auto"))
