"""Wide residual network for 32x32-class inputs, the WRN-28-2 of AdaMatch and FixMatch.

Zagoruyko & Komodakis 2016, in the pre-activation form that Berthelot et al. 2022 and the Keras
AdaMatch example (Paul 2021) train for digit domain adaptation; the context-normalization papers
use that example's model (Faye et al. 2024b, Table VI)."""

from __future__ import annotations

import torch
from torch import nn

from ._checks import require_positive_int, require_probability
from .placement import NormFactory, NormSiteModel, NormSites, PlacementSpec

STEM_CHANNELS = 16
# Channels of the three groups before widening: 16k, 32k, 64k.
GROUP_CHANNELS = (16, 32, 64)
GROUP_STRIDES = (1, 2, 2)


class _WideBlock(nn.Module):
    """Pre-activation residual block: norm-ReLU-conv3x3(stride)-norm-ReLU-(dropout)-conv3x3.

    When the block changes the channel count (the first block of each group), the shortcut is a
    1x1 conv of the *pre-activated* input, as in the reference implementations; otherwise it is
    the identity on the raw input.
    """

    def __init__(
        self,
        sites: NormSites,
        in_channels: int,
        out_channels: int,
        stride: int,
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.norm1 = sites.site(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm2 = sites.site(out_channels)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if in_channels != out_channels or stride != 1
            else None
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.norm1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu(self.norm2(out))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(NormSiteModel):
    """WRN-depth-k: a 3x3 stem conv, three groups of pre-activation blocks, norm-ReLU, pooling.

    Each group has ``(depth - 4) / 6`` blocks of widths 16k, 32k and 64k (strides 1, 2, 2);
    every block holds two norm sites, and the final norm before the pooling is one more, so
    WRN-28-2, the default, has 25 norm sites and 1,467,610 parameters with BatchNorm and 10
    classes (the AdaMatch/FixMatch count); smaller ``depth`` and ``widen_factor`` give the
    reduced models. ReLU and He-normal conv initialisation follow the Keras example.

    Placements: ``"all"`` replaces every norm site (the papers' text: "replacing the BN layers");
    ``"input"`` adds one tested norm on the input image and keeps BatchNorm elsewhere (the
    context-normalization authors' released AdaMatch code, and Faye et al. 2024a, Sec. IV-E:
    "incorporated as initial layers");
    ``"index:I,..."`` replaces the listed sites.

    Args:
        depth: total depth, ``6 n + 4`` with n >= 1 blocks per group (28 for WRN-28-2).
        widen_factor: k, the width multiplier of the groups (2 for WRN-28-2).
        num_classes: number of output logits.
        in_channels: channels of the input images.
        drop_rate: dropout between the two convs of each block (0 in AdaMatch).
        norm_layer: factory of the norm under test (``None``: BatchNorm everywhere).
        placement: where it goes: ``"all"``, ``"input"`` or site indices (see :class:`Placement`).
        base_norm_layer: factory for the other sites (default ``nn.BatchNorm2d``).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        placement: PlacementSpec = "all",
        base_norm_layer: NormFactory | None = None,
    ) -> None:
        super().__init__()
        depth = require_positive_int("depth", depth)
        widen_factor = require_positive_int("widen_factor", widen_factor)
        num_classes = require_positive_int("num_classes", num_classes)
        in_channels = require_positive_int("in_channels", in_channels)
        require_probability("drop_rate", drop_rate)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"depth must be 6 n + 4 with n >= 1 blocks per group (10, 16, 22, 28, ...), "
                f"got {depth}"
            )
        blocks_per_group = (depth - 4) // 6
        sites = self._norm_sites(norm_layer, placement, ("all", "index", "input"), base_norm_layer)

        self.input_norm = sites.input_norm(in_channels)
        self.stem = nn.Conv2d(in_channels, STEM_CHANNELS, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for group_channels, stride in zip(GROUP_CHANNELS, GROUP_STRIDES, strict=True):
            width = group_channels * widen_factor
            for position in range(blocks_per_group):
                blocks.append(
                    _WideBlock(sites, channels, width, stride if position == 0 else 1, drop_rate)
                )
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = sites.site(channels)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        self._set_norm_sites(sites)
        # Keras "he_normal": fan in.
        self._he_initialise(self.classifier, "fan_in")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) for images (N, in_channels, H, W)."""
        features = self.blocks(self.stem(self.input_norm(images)))
        return self.classifier(self.head(self.final_norm(features)))
