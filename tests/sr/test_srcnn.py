"""SRCNN against a plain conv stack and its normalization slots."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_divnorm.models.srcnn import SRCNN
from lit_divnorm.norm.layers import DivisiveNorm


def test_unnormalized_srcnn_is_the_9_5_5_valid_conv_stack():
    model = SRCNN(norm=None)
    x = torch.randn(2, 1, 40, 37)
    c1, c2, c3 = model.convs
    expected = F.conv2d(x, c1.weight, c1.bias).relu()
    expected = F.conv2d(expected, c2.weight, c2.bias).relu()
    expected = F.conv2d(expected, c3.weight, c3.bias)
    assert model.border == 8
    assert [tuple(c.weight.shape) for c in model.convs] == [
        (64, 1, 9, 9),
        (32, 64, 5, 5),
        (1, 32, 5, 5),
    ]
    out = model(x)
    assert out.shape == (2, 1, 40 - 16, 37 - 16)
    torch.testing.assert_close(out, expected)


def test_initialization_is_gaussian_std_1e_3_with_zero_bias():
    model = SRCNN()
    weights = torch.cat([c.weight.flatten() for c in model.convs[:2]])
    assert weights.std().item() == pytest.approx(1e-3, rel=0.02)
    assert abs(weights.mean().item()) < 5e-5
    assert all(torch.count_nonzero(c.bias) == 0 for c in model.convs)


def test_dn_star_slots_take_the_papers_windows():
    spec = {"name": "dn*", "sum_window": 5, "sup_window": 7, "sigma": 1.0, "l1": 0.1}
    model = SRCNN(norm=spec)
    assert [n.num_features for n in model.norms] == [64, 32]
    for norm in model.norms:
        assert isinstance(norm, DivisiveNorm)
        assert norm.sum_field.window == 5 and norm.sup_field.window == 7
        assert norm.sigma == 1.0 and norm.l1 == 0.1 and not norm.affine


def test_norm_sits_between_conv_and_relu():
    model = SRCNN(norm="bn")
    seen = []
    model.norms[0].register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    x = torch.randn(3, 1, 30, 30)
    model(x)
    pre, post = seen[0]
    torch.testing.assert_close(pre, model.convs[0](x))
    assert post.min() < 0  # normalized, not yet rectified


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="kernel_sizes"):
        SRCNN(kernel_sizes=(9, 4, 5))
    with pytest.raises(ValueError, match="filters"):
        SRCNN(filters=(64,))
    with pytest.raises(ValueError, match="init_std"):
        SRCNN(init_std=0)
    with pytest.raises(ValueError, match="H, W > 16"):
        SRCNN()(torch.zeros(1, 1, 16, 40))
