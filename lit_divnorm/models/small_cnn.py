"""The paper's small CIFAR CNN (Ren et al., ICLR 2017, section 5.1), with a norm slot per conv.

    x (N, 3, 32, 32)
    conv 5x5, 32 -> norm -> ReLU -> max-pool 3x3/2   (N, 32, 16, 16)
    conv 5x5, 32 -> norm -> ReLU -> avg-pool 3x3/2   (N, 32, 8, 8)
    conv 5x5, 64 -> norm -> ReLU -> avg-pool 3x3/2   (N, 64, 4, 4)
    flatten -> [dropout] -> FC 1024 -> 64 (linear) -> [dropout] -> FC 64 -> classes

Convolutions and pooling use TF SAME padding (see :mod:`lit_divnorm.models.same_pool`).
Weights start from a normal truncated at two standard deviations (TensorFlow's
``truncated_normal``) with std 1e-4, 1e-2, 1e-2 for the convolutions and 0.1, 0.1 for the
fully connected layers; biases start at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_divnorm.models.same_pool import PoolKind, SamePool2d
from lit_divnorm.norm import NormSpec, build_norm

PAPER_CONV_STD = (1e-4, 1e-2, 1e-2)
PAPER_FC_STD = (0.1, 0.1)


def truncated_normal_(tensor: Tensor, std: float) -> Tensor:
    """Fill ``tensor`` from N(0, std^2) truncated to ``[-2 std, 2 std]`` (TF's truncated_normal)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class ConvNormBlock(nn.Module):
    """conv 5x5 SAME (+ bias) -> norm -> ReLU -> 3x3/2 SAME pooling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: NormSpec,
        window: int,
        pool: PoolKind,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding="same")
        self.norm = build_norm(norm, out_channels, layer_window=window)
        self.act = nn.ReLU()
        self.pool = SamePool2d(pool, kernel=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class SmallCNN(nn.Module):
    """The paper's 3-conv CIFAR network.

    Args:
        num_classes: outputs of the last layer (10 or 100).
        norm: the normalization of every conv layer (a registry name such as ``"dn*"``,
            a mapping ``{"name": ..., **overrides}``, a factory, or ``None``/``"none"``).
        layer_window: the DN window of each conv layer (the paper's 5, 3, 3); used only
            when ``norm`` has a local field.
        channels: output channels of the three convolutions.
        hidden: width of the linear hidden layer (64).
        dropout: dropout probability before each fully connected layer (0: none).
        in_channels, image_size: input shape ``(N, in_channels, image_size, image_size)``.
        conv_std, fc_std: init std of each conv / FC layer (the paper's by default).

    Shapes: ``(N, 3, 32, 32)`` -> logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        norm: NormSpec = None,
        layer_window: Sequence[int] = (5, 3, 3),
        channels: Sequence[int] = (32, 32, 64),
        hidden: int = 64,
        dropout: float = 0.0,
        in_channels: int = 3,
        image_size: int = 32,
        conv_std: Sequence[float] = PAPER_CONV_STD,
        fc_std: Sequence[float] = PAPER_FC_STD,
    ) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        _check_positive("hidden", hidden)
        _check_positive("in_channels", in_channels)
        _check_positive("image_size", image_size)
        for name, values, length in (
            ("layer_window", layer_window, 3),
            ("channels", channels, 3),
            ("conv_std", conv_std, 3),
            ("fc_std", fc_std, 2),
        ):
            if len(values) != length:
                raise ValueError(f"{name} needs {length} entries, got {list(values)!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        pools: tuple[PoolKind, ...] = ("max", "avg", "avg")
        blocks = []
        previous = in_channels
        for out, window, pool in zip(channels, layer_window, pools, strict=True):
            blocks.append(ConvNormBlock(previous, out, norm, window, pool))
            previous = out
        self.features = nn.Sequential(*blocks)
        size = image_size
        for _ in pools:
            size = -(-size // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(previous * size * size, hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.reset_parameters(conv_std, fc_std)

    @torch.no_grad()
    def reset_parameters(
        self, conv_std: Sequence[float] = PAPER_CONV_STD, fc_std: Sequence[float] = PAPER_FC_STD
    ) -> None:
        """The paper's init: truncated normal weights, zero biases."""
        convs = [block.conv for block in self.features]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        for layer, std in zip([*convs, *linears], [*conv_std, *fc_std], strict=True):
            truncated_normal_(layer.weight, std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
