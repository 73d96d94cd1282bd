"""The paper's CIFAR CNN (TF SAME pooling, init) and the pre-activation ResNet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_divnorm.models.resnet import PreActResNet, PreActUnit
from lit_divnorm.models.same_pool import pool2d_same, same_padding
from lit_divnorm.models.small_cnn import SmallCNN
from lit_divnorm.norm import DivisiveNorm


def test_same_pool_matches_hand_computation_4x4():
    # 3x3 stride 2 SAME on 4x4: 2 outputs, pad 0 before and 1 after.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(pool2d_same(x, "max", 3, 2), torch.tensor([[[[10.0, 11.0], [14.0, 15.0]]]]))
    # windows {0,1,2}x{0,1,2}: mean 5; {0,1,2}x{2,3}: 6.5; {2,3}x{0,1,2}: 11; {2,3}x{2,3}: 12.5
    expected = torch.tensor([[[[5.0, 6.5], [11.0, 12.5]]]])
    assert torch.allclose(pool2d_same(x, "avg", 3, 2), expected)


def test_same_pool_matches_hand_computation_5x5_negative():
    # 3x3 stride 2 SAME on 5x5: 3 outputs, pad 1 before and 1 after; all values negative, so
    # a max that picked a zero pad would show up.
    x = -1.0 - torch.arange(25.0).reshape(1, 1, 5, 5)
    out = pool2d_same(x, "max", 3, 2)
    assert out[0, 0, 0, 0] == -1.0  # rows {0,1}, cols {0,1}
    assert out[0, 0, 2, 2] == -19.0  # rows {3,4}, cols {3,4}: max of -19, -20, -24, -25
    avg = pool2d_same(x, "avg", 3, 2)
    assert avg[0, 0, 0, 0] == pytest.approx(-(1 + 2 + 6 + 7) / 4)
    assert avg[0, 0, 1, 2] == pytest.approx(-(9 + 10 + 14 + 15 + 19 + 20) / 6)


def _loop_pool(x: torch.Tensor, kind: str, k: int, s: int) -> torch.Tensor:
    """TF SAME by its documented rule: out = ceil(L/s), total pad split floor before."""
    n, c, h, w = x.shape
    oh, ow = math.ceil(h / s), math.ceil(w / s)
    top = max((oh - 1) * s + k - h, 0) // 2
    left = max((ow - 1) * s + k - w, 0) // 2
    out = torch.empty(n, c, oh, ow)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - top, j * s - left
            window = x[:, :, max(r0, 0) : min(r0 + k, h), max(c0, 0) : min(c0 + k, w)]
            out[:, :, i, j] = window.amax((2, 3)) if kind == "max" else window.mean((2, 3))
    return out


@pytest.mark.parametrize("size", [(32, 32), (7, 8), (16, 5)])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_same_pool_matches_loop(size, kind):
    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(pool2d_same(x, kind, 3, 2), _loop_pool(x, kind, 3, 2))


def test_same_padding_values():
    assert same_padding(32, 3, 2) == (0, 1)
    assert same_padding(5, 3, 2) == (1, 1)
    assert same_padding(32, 5, 1) == (2, 2)


def test_small_cnn_shapes_and_paper_init():
    model = SmallCNN(num_classes=100, norm="dn")
    x = torch.randn(4, 3, 32, 32)
    sizes = []
    h = x
    for block in model.features:
        h = block(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(32, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert model(x).shape == (4, 100)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 64), (64, 100)]
    layers = [b.conv for b in model.features] + linears
    for layer, std in zip(layers, (1e-4, 1e-2, 1e-2, 0.1, 0.1), strict=True):
        assert layer.weight.abs().max() <= 2 * std
        assert layer.weight.std().item() == pytest.approx(std * 0.88, rel=0.2)  # truncated at 2
        assert torch.count_nonzero(layer.bias) == 0


def test_small_cnn_pools_are_max_avg_avg():
    model = SmallCNN(norm=None)
    assert [b.pool.kind for b in model.features] == ["max", "avg", "avg"]
    assert all(b.conv.kernel_size == (5, 5) for b in model.features)


@pytest.mark.parametrize(
    ("norm", "windows"),
    [("dn", (5, 3, 3)), ({"name": "dn*", "sigma": 0.5, "l1": 0.001}, (5, 3, 3)), ("bn", None)],
)
def test_small_cnn_norm_slots_and_windows(norm, windows):
    model = SmallCNN(norm=norm)
    norms = [b.norm for b in model.features]
    assert all(isinstance(n, DivisiveNorm) for n in norms)
    if windows is None:
        assert all(n.sum_field.batch for n in norms)
    else:
        assert [n.sum_field.window for n in norms] == list(windows)
        assert [n.sup_field.window for n in norms] == list(windows)


def test_small_cnn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer_window"):
        SmallCNN(layer_window=(5, 3))
    with pytest.raises(ValueError, match="dropout"):
        SmallCNN(dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        SmallCNN(num_classes=0)


def _weighted_layers(model: nn.Module) -> int:
    """Convs on the main path plus the FC layer (the depth count of a ResNet)."""
    projections = {id(m.projection) for m in model.modules() if isinstance(m, PreActUnit)}
    return sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in projections for m in model.modules()
    )


@pytest.mark.parametrize(
    ("depth", "block", "units"), [(32, "basic", 5), (110, "basic", 18), (164, "bottleneck", 18)]
)
def test_resnet_depth(depth, block, units):
    model = PreActResNet(depth=depth, block=block, norm="bn")
    assert _weighted_layers(model) == depth
    assert [len(stage) for stage in model.stages] == [units] * 3
    per_unit = 2 if block == "basic" else 3
    norms = [m for m in model.modules() if isinstance(m, DivisiveNorm)]
    assert len(norms) == 3 * units * per_unit + 1


def test_resnet32_forward_windows_and_learned_sigma():
    norm = {"name": "dn", "sigma": 0.5, "learn_sigma": True}
    model = PreActResNet(depth=32, num_classes=10, norm=norm)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for s, window in enumerate((7, 5, 5)):
        stage_norms = [m for m in model.stages[s].modules() if isinstance(m, DivisiveNorm)]
        assert len(stage_norms) == 10
        assert {n.sum_field.window for n in stage_norms} == {window}
    assert model.final_norm.sup_field.window == 5
    sigmas = [float(m.sigma.detach()) for m in model.modules() if isinstance(m, DivisiveNorm)]
    assert len(sigmas) == 31 and sigmas == pytest.approx([0.5] * 31)
    assert all(m.raw_sigma.requires_grad for m in model.modules() if isinstance(m, DivisiveNorm))


def test_resnet_shortcut_pools_and_zero_pads_channels():
    unit = PreActUnit(2, 4, 2, "none", 5, "basic", activate_before_residual=False)
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    shortcut = unit._shortcut(x)
    assert shortcut.shape == (1, 4, 2, 2)
    assert torch.count_nonzero(shortcut[:, 0]) == 0 and torch.count_nonzero(shortcut[:, 3]) == 0
    # channel 0 of x moved to channel 1: 2x2 average of [[0, 1], [4, 5]] is 2.5
    assert shortcut[0, 1, 0, 0] == 2.5 and shortcut[0, 2, 1, 1] == (26 + 27 + 30 + 31) / 4
    assert unit(x).shape == (1, 4, 2, 2)


def test_resnet_bottleneck_forward():
    model = PreActResNet(depth=11, block="bottleneck", norm="ln", num_classes=100)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 100)


@pytest.mark.parametrize(("depth", "block"), [(33, "basic"), (32, "bottleneck"), (2, "basic")])
def test_resnet_rejects_bad_depth(depth, block):
    with pytest.raises(ValueError, match="depth"):
        PreActResNet(depth=depth, block=block)
