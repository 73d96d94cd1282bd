"""Registry behaviour and the L1 sparsity penalty against hand-computed values."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lit_divnorm.norm import (
    DivisiveNorm,
    build_norm,
    list_norms,
    register_norm,
    sparsity_penalty,
)
from lit_divnorm.norm.registry import _REGISTRY

PAPER_NAMES = [
    "none", "bn", "bn-s", "bn-l1", "bn*", "bnms", "ln", "ln-s", "ln-l1", "ln*", "lnms",
    "dn", "dn*", "dnms", "in", "gn", "baseline-l1",
]  # fmt: skip


def test_every_paper_variant_is_registered():
    assert set(PAPER_NAMES) <= set(list_norms())


@pytest.mark.parametrize(
    "name, sigma, affine, l1",
    [
        ("bn", 0.0, True, 0.0),
        ("bn-s", 1.0, True, 0.0),
        ("bn-l1", 0.0, True, 0.005),
        ("bn*", 1.0, True, 0.005),
        ("ln-s", 0.5, False, 0.0),
        ("ln*", 0.5, False, 0.005),
        ("dn", 0.5, False, 0.0),
        ("dn*", 0.5, False, 0.005),
    ],
)
def test_registry_defaults_follow_the_paper_flags(name, sigma, affine, l1):
    norm = build_norm(name, 8)
    assert (norm.fixed_sigma, norm.affine, norm.l1) == (sigma, affine, l1)


def test_ms_variants_do_not_divide():
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(build_norm("lnms", 8)(x), x - x.mean(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(build_norm("bnms", 8)(x), x - x.mean(dim=(0, 2, 3), keepdim=True))


def test_issue_example_and_name_lookup_is_case_insensitive():
    norm = build_norm("DN*", 32, window=5, sigma=0.5, l1=0.005)
    assert norm.sum_field.window == 5 and norm.sup_field.window == 5
    assert norm(torch.randn(2, 32, 8, 8)).shape == (2, 32, 8, 8)


def test_spec_as_mapping_and_callable():
    norm = build_norm({"name": "dn*", "sigma": 1.0, "sum_window": 5, "sup_window": 7}, 4)
    assert (norm.fixed_sigma, norm.sum_field.window, norm.sup_field.window) == (1.0, 5, 7)
    assert isinstance(build_norm(nn.BatchNorm2d, 4), nn.BatchNorm2d)
    gn = build_norm(functools.partial(nn.GroupNorm, 2), 4)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 2
    assert isinstance(build_norm(None, 4), nn.Identity)


def test_layer_window_applies_only_to_local_norms_and_explicit_window_wins():
    assert build_norm("dn", 4, layer_window=7).sum_field.window == 7
    assert build_norm("dn", 4, layer_window=7, window=5).sum_field.window == 5
    assert build_norm("bn", 4, layer_window=7).sum_field.positions == "all"
    assert isinstance(build_norm("none", 4, layer_window=7), nn.Identity)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown norm 'dn\+'.*bn\*.*dn\*"):
        build_norm("dn+", 4)


def test_unknown_override_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['sigam'\].*sigma"):
        build_norm("dn", 4, sigam=0.5)
    with pytest.raises(ValueError, match="takes no argument"):
        build_norm("none", 4, sigma=0.5)


def test_register_norm_for_user_extensions():
    @register_norm("test-wide-dn")
    def wide_dn(num_features: int, **overrides) -> nn.Module:
        return DivisiveNorm(num_features, "local", "local", **{"window": 9, **overrides})

    try:
        assert build_norm("test-wide-dn", 4).sum_field.window == 9
        with pytest.raises(ValueError, match="already registered"):
            register_norm("test-wide-dn", wide_dn)
    finally:
        _REGISTRY.pop("test-wide-dn")


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = build_norm("ln*", 3, l1=0.02)
        self.second = build_norm("baseline-l1", 3, l1=0.1)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_sparsity_penalty_of_two_layers_equals_hand_computed_sum():
    model = TwoLayer()
    x = torch.randn(4, 3, 5, 5)
    y1 = model.first(x)
    model.second(torch.relu(y1))
    penalty = sparsity_penalty(model)
    centred = x - x.mean(dim=(1, 2, 3), keepdim=True)  # ln's own summation field
    want = 0.02 * centred.abs().mean() + 0.1 * torch.relu(y1).abs().mean()  # baseline: raw input
    torch.testing.assert_close(penalty, want)
    assert float(sparsity_penalty(model)) == 0.0  # consumed


def test_sparsity_sums_over_repeated_calls_and_skips_eval():
    norm = build_norm("dn*", 3, window=3, l1=0.5)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    norm(a)
    norm(b)
    per_call = [
        0.5
        * (t - torch.nn.functional.avg_pool2d(t, 3, 1, 1, count_include_pad=False).mean(1, True))
        .abs()
        .mean()
        for t in (a, b)
    ]
    torch.testing.assert_close(sparsity_penalty(norm), per_call[0] + per_call[1])
    norm.eval()
    norm(a)
    assert float(sparsity_penalty(norm)) == 0.0


def test_sparsity_penalty_is_differentiable():
    norm = build_norm("bn*", 3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    norm(x)
    sparsity_penalty(norm).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dn_star_penalty_gradient_matches_finite_differences():
    """The layer's l1 weight is folded into the C++ operator's sparsity output; its value and
    its gradient (through the kernels' sign terms) against float64 finite differences."""
    norm = build_norm("dn*", 4, window=3, l1=0.7).double()
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        y = norm(x)
        return y, sparsity_penalty(norm)

    centred = x - torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False).mean(1, True)
    torch.testing.assert_close(f(x)[1], 0.7 * centred.abs().mean())
    assert torch.autograd.gradcheck(f, (x,))
