"""The Shallow CNN of Kalayeh & Shah 2019, as Faye et al. 2024a (Table IV) describe it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import require_positive_int
from .placement import NormFactory, NormSiteModel, PlacementSpec


class ShallowCNN(NormSiteModel):
    """Shallow CNN: conv+norm+ReLU blocks, max pooling between them, global average pooling.

    With the default widths this is Faye et al. 2024a, Table IV: three conv5x5 (padding 2) + norm
    + ReLU blocks, each followed by a 3x3 stride-2 max pool, then conv3x3 (padding 1) + norm +
    ReLU, average pooling and a linear classifier. One norm site per conv, so 4 sites; the papers
    put the norm under test after conv2 or conv3 (``placement=1`` or ``2``).

    The pools round up (``ceil_mode``), as Caffe does, so 32x32 inputs give the table's 16, 8, 4;
    the table's final 4x4 average pool is a global average here, so 8x8 or 28x28 inputs work too.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        widths: output channels of each conv; every conv but the last is 5x5 and followed by
            max pooling, the last is 3x3.
        norm_layer: factory of the norm under test (``None``: BatchNorm everywhere).
        placement: where it goes: ``"all"``, ``"input"`` or site indices (see :class:`Placement`).
        base_norm_layer: factory for the other sites (default ``nn.BatchNorm2d``).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 128, 256),
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        placement: PlacementSpec = "all",
        base_norm_layer: NormFactory | None = None,
    ) -> None:
        super().__init__()
        num_classes = require_positive_int("num_classes", num_classes)
        in_channels = require_positive_int("in_channels", in_channels)
        if isinstance(widths, str) or not isinstance(widths, Sequence) or not widths:
            raise ValueError(
                f"widths must be a non-empty sequence of channel counts, got {widths!r}"
            )
        widths = [require_positive_int(f"widths[{i}]", width) for i, width in enumerate(widths)]
        sites = self._norm_sites(norm_layer, placement, ("all", "index", "input"), base_norm_layer)

        self.input_norm = sites.input_norm(in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for position, width in enumerate(widths):
            is_last = position == len(widths) - 1
            kernel_size = 3 if is_last else 5
            layers += [
                # No conv bias: the norm that follows subtracts a mean, which cancels it.
                nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2, bias=False),
                sites.site(width),
                nn.ReLU(),
            ]
            if not is_last:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._set_norm_sites(sites)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) for images (N, in_channels, H, W)."""
        features = self.features(self.input_norm(images))
        return self.classifier(self.pool(features).flatten(1))
