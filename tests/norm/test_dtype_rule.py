"""One dtype rule on every path: the output has the input's dtype, whatever the module's.

Torch's own norms follow the input where they accept a mix (LocalResponseNorm always; the
others take float32 parameters with a bfloat16 input) and refuse other mixes; our layers accept
every mix and follow the input. The values are checked against the layer in float64 on the
input in float64 (torch's own GroupNorm for ``gn``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_divnorm.norm import build_norm
from lit_divnorm.norm.kernels import cpu

NAMES = ("dn", "dn*", "dnms", "bn", "bn*", "ln*", "in", "gn", "lrn", "rmsnorm", "frn", "gdn")
KWARGS = {"dn": {"window": 3}, "dn*": {"window": 3}, "dnms": {"window": 3}, "gn": {"groups": 2}}
PATHS = {
    "default": {},
    "torch": {"backend": "torch"},
    "check_finite": {"check_finite": True},
    "native": {"backend": "native"},
}
# (module dtype, input dtype): the mixes torch refuses or follows
MIXES = [
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.bfloat16),
]


def _build(name: str, **extra) -> nn.Module:
    kwargs = {**KWARGS.get(name, {}), **extra}
    try:
        return build_norm(name, 4, affine=True, **kwargs)
    except ValueError:  # (a norm without an affine argument, or with fixed settings)
        return build_norm(name, 4, **kwargs)


def test_torch_follows_the_input_where_it_accepts_a_mix():
    x = torch.randn(2, 4, 5, 5)
    assert nn.LocalResponseNorm(3).double()(x).dtype == torch.float32
    assert nn.GroupNorm(1, 4)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_output_dtype_is_the_input_dtype_on_every_path(name, path):
    extra = PATHS[path]
    if path != "default" and name in ("frn", "gdn"):
        pytest.skip(f"{name} takes no backend or check_finite")
    if path == "native" and not cpu.available():
        pytest.skip("the C++ kernels are not built here")
    torch.manual_seed(0)
    base = _build(name, **extra).train()
    with torch.no_grad():  # affine weights away from 1 and 0, so that a cast would show
        for p in base.parameters():
            p.add_(torch.rand_like(p) * 0.5)
    for module_dtype, input_dtype in MIXES:
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        reference = _reference(name, base, x)
        module = _copy(base).to(module_dtype)
        y = module(x.to(input_dtype))
        assert y.dtype == input_dtype, (name, path, module_dtype, input_dtype)
        low = torch.bfloat16 in (module_dtype, input_dtype)
        tol = {"rtol": 5e-2, "atol": 5e-2} if low else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(y.double(), reference, **tol)


def _copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def _reference(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output in float64: torch's GroupNorm for gn, else the layer in float64 (its
    float64 values are tested against the paper's formula elsewhere)."""
    if name == "gn":
        torch_gn = nn.GroupNorm(2, 4, eps=module.eps).double()
        torch_gn.load_state_dict({"weight": module.weight, "bias": module.bias})
        return torch_gn(x).detach()
    with torch.no_grad():
        return _copy(module).double()(x)
