"""``torch.compile(fullgraph=True, dynamic=True)`` of every registry norm: no graph break, no
recompile over two batch sizes and two map sizes, outputs and input gradients as eager."""

from __future__ import annotations

import pytest
import torch

from lit_divnorm.norm import build_norm, list_norms

CHANNELS = 4
SHAPES = ((2, 5), (3, 5), (3, 6))  # two batch sizes, two map sizes: one graph for all
# one test per group of names (a fresh dynamo per name; fewer pytest items)
GROUPS = {
    "batch": ("bn", "bn-s", "bn-l1", "bn*", "bnms"),
    "layer": ("ln", "ln-s", "ln-l1", "ln*", "lnms", "rmsnorm"),
    "local": ("dn", "dn*", "dnms", "lcn"),
    "channel": ("lrn", "lrn-alexnet"),
    "other": ("in", "gn", "frn", "gdn", "igdn", "none", "baseline-l1"),
}
KWARGS = {"dn": {"window": 3}, "dn*": {"window": 3}, "dnms": {"window": 3}, "gn": {"groups": 2}}


def test_groups_cover_the_registry():
    grouped = sorted(name for names in GROUPS.values() for name in names)
    assert grouped == list_norms()


def _step(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = module(x)
    (grad,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), x)
    return y.detach(), grad


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_dynamic_fullgraph_compile(group):
    for name in GROUPS[group]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = build_norm(name, CHANNELS, **KWARGS.get(name, {})).train()
        compiled = torch.compile(module, fullgraph=True, dynamic=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch, size in SHAPES:
                x = torch.randn(batch, CHANNELS, size, size)
                y, grad = _step(compiled, x)
                y_eager, grad_eager = _step(module, x)
                torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-4, msg=name)
                torch.testing.assert_close(grad, grad_eager, atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()
