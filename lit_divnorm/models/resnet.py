"""Pre-activation ResNet for CIFAR (He et al., 2016) with every norm slot from the registry.

Depth ``d``: basic blocks (two 3x3 convs) with ``(d - 2) / 6`` units per stage (ResNet-32:
5, ResNet-110: 18), or bottleneck blocks (1x1, 3x3, 1x1) with ``(d - 2) / 9`` units per stage
(ResNet-164: 18). Filters 16 -> 16, 32, 64 (bottleneck: 16 -> 64, 128, 256), strides 1, 2, 2::

    x (N, 3, 32, 32) -> conv 3x3, 16
    stage s (s = 1, 2, 3), units u:  h + F(h),   F = [norm -> ReLU -> conv] x 2 (or x 3)
    norm -> ReLU -> global average pool -> FC -> logits (N, num_classes)

As in the released code (after TensorFlow's CIFAR ResNet): the first unit of stage 1 shares
its pre-activation with the shortcut; a basic unit that changes the width uses an average
pool shortcut with zero-padded channels, a bottleneck unit a 1x1 projection; convolutions
have no bias and He-normal (truncated) init; the FC layer is uniform(+-sqrt(3 / fan_in)).

Every norm slot of stage ``s`` gets the stage's DN window (7, 5, 5) and the final norm its
own (5), used only when the chosen norm has a local field. A learned sigma (the released DN
configs: init 0.5 on CIFAR-10, 2.0 on CIFAR-100) is a norm override:
``norm={"name": "dn", "sigma": 0.5, "learn_sigma": True}``.

The released code decays only conv and FC weights (``wd * ||w||^2 / 2``); our configs use
SGD's ``weight_decay`` (the same gradient) on every parameter, norm parameters included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_divnorm.norm import NormSpec, build_norm

BlockKind = Literal["basic", "bottleneck"]


def conv_he_init_(conv: nn.Conv2d) -> None:
    """Truncated normal with std ``sqrt(2 / (k * k * out_channels))``."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    std = math.sqrt(2.0 / (k * conv.out_channels))
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    # TF SAME for odd kernels: stride 1 pads k // 2 on both sides; stride 2 on even sizes
    # pads (k - 2) // 2 before and k // 2 after, done in PreActUnit.
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=0, bias=False)


def _same_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply ``conv`` with TF SAME padding (asymmetric for stride 2)."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    pads = []
    for length in (x.shape[3], x.shape[2]):
        out = -(-length // stride)
        total = max((out - 1) * stride + kernel - length, 0)
        pads += [total // 2, total - total // 2]
    return conv(F.pad(x, pads) if any(pads) else x)


class PreActUnit(nn.Module):
    """One pre-activation residual unit (basic: 2 convs 3x3; bottleneck: 1x1, 3x3, 1x1).

    Shapes: ``(N, in_channels, H, W)`` -> ``(N, out_channels, ceil(H / stride), ...)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: NormSpec,
        window: int,
        block: BlockKind,
        activate_before_residual: bool,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.block = block
        self.activate_before_residual = activate_before_residual
        if block == "basic":
            widths = [in_channels, out_channels, out_channels]
            kernels = [3, 3]
        else:
            widths = [in_channels, out_channels // 4, out_channels // 4, out_channels]
            kernels = [1, 3, 1]
        self.norms = nn.ModuleList(
            build_norm(norm, width, layer_window=window) for width in widths[:-1]
        )
        self.convs = nn.ModuleList(
            _conv(widths[i], widths[i + 1], k, stride if i == 0 else 1)
            for i, k in enumerate(kernels)
        )
        self.projection = None
        if block == "bottleneck" and in_channels != out_channels:
            self.projection = _conv(in_channels, out_channels, 1, stride)

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.in_channels == self.out_channels:
            return x
        if self.projection is not None:
            return _same_conv(self.projection, x)
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norms[0](x))
        shortcut = self._shortcut(h if self.activate_before_residual else x)
        h = _same_conv(self.convs[0], h)
        for norm, conv in zip(self.norms[1:], self.convs[1:], strict=True):
            h = _same_conv(conv, F.relu(norm(h)))
        return h + shortcut


def units_per_stage(depth: int, block: BlockKind) -> int:
    """``(depth - 2) / 6`` for basic blocks, ``(depth - 2) / 9`` for bottlenecks."""
    per_unit = 6 if block == "basic" else 9
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 2 + per_unit
        or ((depth - 2) % per_unit)
    ):
        raise ValueError(
            f"depth must be {per_unit} * n + 2 (n >= 1) for {block} blocks "
            f"(e.g. {'32, 110' if block == 'basic' else '164'}), got {depth!r}"
        )
    return (depth - 2) // per_unit


class PreActResNet(nn.Module):
    """Pre-activation CIFAR ResNet with a norm in every slot.

    Args:
        depth: 32, 110 (basic) or 164 (bottleneck); any ``6n + 2`` / ``9n + 2``.
        num_classes: outputs (10 or 100).
        norm: the normalization of every slot (registry name, mapping, factory or None).
        block: ``"basic"`` or ``"bottleneck"``.
        layer_window: DN window of each stage and of the final norm (7, 5, 5, 5).
        filters: initial conv width and basic width of the three stages (16, 16, 32, 64);
            bottleneck stages are 4 times wider.
        dropout: dropout probability before the FC layer (0: none).

    Shapes: ``(N, 3, H, W)`` -> logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        depth: int = 32,
        num_classes: int = 10,
        norm: NormSpec = "bn",
        block: BlockKind = "basic",
        layer_window: Sequence[int] = (7, 5, 5, 5),
        filters: Sequence[int] = (16, 16, 32, 64),
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        units = units_per_stage(depth, block)
        if len(layer_window) != 4:
            raise ValueError(
                f"layer_window needs 4 entries (3 stages + final norm), got {list(layer_window)!r}"
            )
        if len(filters) != 4:
            raise ValueError(f"filters needs 4 entries, got {list(filters)!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.depth = depth
        self.block = block
        widths = [filters[0]] + [f * (4 if block == "bottleneck" else 1) for f in filters[1:]]
        self.stem = _conv(in_channels, widths[0], 3, 1)
        stages = []
        for s, stride in enumerate((1, 2, 2)):
            stage = [
                PreActUnit(
                    widths[s] if u == 0 else widths[s + 1],
                    widths[s + 1],
                    stride if u == 0 else 1,
                    norm,
                    layer_window[s],
                    block,
                    activate_before_residual=(s == 0 and u == 0),
                )
                for u in range(units)
            ]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.final_norm = build_norm(norm, widths[-1], layer_window=layer_window[3])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                conv_he_init_(module)
        bound = math.sqrt(3.0 / self.fc.in_features)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(_same_conv(self.stem, x))
        h = F.relu(self.final_norm(h)).mean(dim=(2, 3))
        return self.fc(self.dropout(h))
