"""DenseNet for CIFAR-sized images (Huang et al. 2017), as in Faye et al. 2024b, Tables I-IV."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._checks import require_positive_int, require_probability
from .placement import NormFactory, NormSiteModel, NormSites, PlacementSpec


def _norm_relu_conv(
    sites: NormSites, in_channels: int, out_channels: int, kernel_size: int, drop_rate: float
) -> list[nn.Module]:
    """DenseNet's pre-activation unit: norm, ReLU, conv, then dropout as in the DenseNet paper."""
    return [
        sites.site(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.Dropout(drop_rate),
    ]


class _DenseLayer(nn.Module):
    """Adds ``growth_rate`` new feature maps to its input (concatenated along channels)."""

    def __init__(
        self,
        sites: NormSites,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool,
        drop_rate: float,
    ) -> None:
        super().__init__()
        units: list[nn.Module] = []
        if bottleneck:
            # DenseNet-B: a 1x1 conv first reduces the input to 4 * growth_rate maps.
            units += _norm_relu_conv(sites, in_channels, 4 * growth_rate, 1, drop_rate)
            in_channels = 4 * growth_rate
        units += _norm_relu_conv(sites, in_channels, growth_rate, 3, drop_rate)
        self.new_features = nn.Sequential(*units)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features, self.new_features(features)], dim=1)


class DenseNet(NormSiteModel):
    """DenseNet for 32x32-class inputs: a 3x3 stem conv, three dense blocks, two transitions.

    Each dense layer is norm-ReLU-conv3x3 (with ``bottleneck``, norm-ReLU-conv1x1 to
    ``4 * growth_rate`` maps first); each transition is norm-ReLU-conv1x1-avgpool2 and keeps
    ``floor(compression * channels)`` maps; the head is norm-ReLU, global average pooling and a
    linear classifier. Every norm of this list is a norm site, in forward order; Faye et al. 2024b
    replace all of them (``placement="all"``). DenseNet-40 (k=12) has 39 sites and about 1.0M
    parameters, DenseNet-100 (k=12) 99 sites and about 7.0M.

    Args:
        depth: total layer count; ``(depth - 4)`` must be divisible by 3 (by 6 with bottleneck).
        growth_rate: feature maps each dense layer adds (k).
        num_classes: number of output logits.
        in_channels: channels of the input images.
        bottleneck: use DenseNet-B layers (two convs per layer).
        compression: share of the maps a transition keeps, in (0, 1] (DenseNet-C uses 0.5).
        drop_rate: dropout after every conv but the stem (the DenseNet paper uses 0.2 without
            data augmentation).
        norm_layer: factory of the norm under test (``None``: BatchNorm everywhere).
        placement: where it goes: ``"all"``, ``"input"`` or site indices (see :class:`Placement`).
        base_norm_layer: factory for the other sites (default ``nn.BatchNorm2d``).
    """

    def __init__(
        self,
        depth: int = 40,
        growth_rate: int = 12,
        num_classes: int = 10,
        in_channels: int = 3,
        bottleneck: bool = False,
        compression: float = 1.0,
        drop_rate: float = 0.0,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        placement: PlacementSpec = "all",
        base_norm_layer: NormFactory | None = None,
    ) -> None:
        super().__init__()
        depth = require_positive_int("depth", depth)
        growth_rate = require_positive_int("growth_rate", growth_rate)
        num_classes = require_positive_int("num_classes", num_classes)
        in_channels = require_positive_int("in_channels", in_channels)
        require_probability("drop_rate", drop_rate)
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        convs_per_layer = 2 if bottleneck else 1
        if depth < 4 + 3 * convs_per_layer or (depth - 4) % (3 * convs_per_layer):
            raise ValueError(
                f"depth must be 4 + {3 * convs_per_layer} * n with n >= 1 "
                f"({'with' if bottleneck else 'without'} bottleneck), got {depth}"
            )
        layers_per_block = (depth - 4) // (3 * convs_per_layer)
        sites = self._norm_sites(norm_layer, placement, ("all", "index", "input"), base_norm_layer)

        self.input_norm = sites.input_norm(in_channels)
        # The DenseNet paper's stem: 16 maps, or twice the growth rate for DenseNet-BC.
        channels = 2 * growth_rate if bottleneck and compression < 1.0 else 16
        stages: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(layers_per_block):
                stages.append(_DenseLayer(sites, channels, growth_rate, bottleneck, drop_rate))
                channels += growth_rate
            if block < 2:
                kept = int(compression * channels)
                stages.append(
                    nn.Sequential(
                        *_norm_relu_conv(sites, channels, kept, 1, drop_rate), nn.AvgPool2d(2)
                    )
                )
                channels = kept
        stages += [sites.site(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(channels, num_classes)
        self._set_norm_sites(sites)
        # As in the DenseNet code: fan out.
        self._he_initialise(self.classifier, "fan_out")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) for images (N, in_channels, H, W)."""
        return self.classifier(self.features(self.input_norm(images)))


def _densenet_preset(depth: int) -> Callable[..., DenseNet]:
    """A DenseNet builder with ``depth`` fixed that takes every other DenseNet argument."""

    def build(**kwargs: Any) -> DenseNet:
        return DenseNet(depth=depth, **kwargs)

    # Give the builder DenseNet's own signature (minus depth) so that help() and the model
    # registry's argument check see the real arguments.
    full_signature = inspect.signature(DenseNet)
    build.__signature__ = full_signature.replace(  # type: ignore[attr-defined]
        parameters=[
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, parameter in full_signature.parameters.items()
            if name != "depth"
        ],
        return_annotation=DenseNet,
    )
    build.__name__ = build.__qualname__ = f"densenet{depth}"
    build.__doc__ = (
        f"DenseNet-{depth} (growth rate 12 unless given): ``DenseNet(depth={depth}, **kwargs)``."
    )
    return build


densenet40 = _densenet_preset(40)
densenet100 = _densenet_preset(100)
