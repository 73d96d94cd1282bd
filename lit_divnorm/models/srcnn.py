"""SRCNN (Dong et al., 2014) with a normalization slot before each ReLU (Ren et al., 2017).

    bicubic (N, C, H, W)
      -> conv 9x9, 64 -> norm -> ReLU
      -> conv 5x5, 32 -> norm -> ReLU
      -> conv 5x5, C
      -> (N, C, H - 16, W - 16)

All convolutions are VALID (no padding), so the output lacks ``border = 4 + 2 + 2 = 8``
pixels on each side of the input; the target is cropped to match. Weights are drawn from
``N(0, init_std^2)`` (``1e-3`` in the paper and the released code), biases are zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lit_divnorm.norm.registry import NormSpec, build_norm


class SRCNN(nn.Module):
    """The 9-5-5 super-resolution CNN; ``norm`` fills the two slots before the ReLUs.

    Args:
        norm: registry name / mapping / callable / ``None`` (no normalization). The paper's DN*
            is ``{"name": "dn*", "sum_window": 5, "sup_window": 7, "sigma": 1.0, "l1": 0.1}``.
        channels: image channels in and out (1: the Y channel).
        filters: channels of the two hidden layers (64, 32).
        kernel_sizes: the three kernel sizes (9, 5, 5); odd.
        init_std: standard deviation of the Gaussian weight initialization.

    Shapes: input ``(N, channels, H, W)`` with ``H, W > 2 * border``; output
    ``(N, channels, H - 2 * border, W - 2 * border)``.
    """

    def __init__(
        self,
        norm: NormSpec = None,
        channels: int = 1,
        filters: Sequence[int] = (64, 32),
        kernel_sizes: Sequence[int] = (9, 5, 5),
        init_std: float = 1e-3,
    ) -> None:
        super().__init__()
        filters = tuple(filters)
        kernel_sizes = tuple(kernel_sizes)
        if len(filters) != 2 or any(not isinstance(f, int) or f < 1 for f in filters):
            raise ValueError(f"filters must be two positive ints, got {filters!r}")
        if len(kernel_sizes) != 3 or any(
            not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel_sizes
        ):
            raise ValueError(f"kernel_sizes must be three positive odd ints, got {kernel_sizes!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(init_std, (int, float)) or not init_std > 0:
            raise ValueError(f"init_std must be a positive number, got {init_std!r}")
        widths = (channels, *filters, channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], kernel_sizes[i]) for i in range(3)
        )
        self.norms = nn.ModuleList(build_norm(norm, width) for width in filters)
        self.activation = nn.ReLU()
        self.border = sum((k - 1) // 2 for k in kernel_sizes)
        self.init_std = float(init_std)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=self.init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or min(x.shape[-2:]) <= 2 * self.border:
            raise ValueError(
                f"SRCNN input must be (N, C, H, W) with H, W > {2 * self.border}, got shape "
                f"{tuple(x.shape)}"
            )
        for conv, norm in zip(self.convs[:-1], self.norms, strict=True):
            x = self.activation(norm(conv(x)))
        return self.convs[-1](x)

    def extra_repr(self) -> str:
        return f"border={self.border}, init_std={self.init_std}"
