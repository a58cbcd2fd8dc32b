"""Models by name, for configs: the :data:`MODELS` registry and ``build_model``.

Register a model of your own with ``@MODELS.register("name")`` on a class or function that
takes ``num_classes``, ``in_channels``, ``norm_layer`` (and, where it applies, ``image_size``,
``placement`` and ``base_norm_layer``) besides its own size arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from contextnorm.registry import Registry

from .densenet import DenseNet, densenet40, densenet100
from .placement import NormFactory, PlacementSpec
from .shallow_cnn import ShallowCNN
from .vit import VisionTransformer
from .wide_resnet import WideResNet

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
"""Models by name (``model.name`` in a config)."""

MODELS.register("shallow_cnn", ShallowCNN, summary="Shallow CNN of the Mixture Normalization paper")
MODELS.register("densenet40", densenet40, summary="DenseNet-40 (growth rate 12) for 32x32 images")
MODELS.register("densenet100", densenet100, summary="DenseNet-100 (growth rate 12)")
MODELS.register("densenet", DenseNet, summary="DenseNet of any depth (options: depth, ...)")
MODELS.register("vit", VisionTransformer, summary="Vision Transformer of the Keras example")
MODELS.register(
    "wide_resnet",
    WideResNet,
    summary="Wide ResNet, WRN-28-2 of AdaMatch by default (options: depth, widen_factor)",
)

# Arguments build_model sets itself; they cannot come in as size arguments.
_COMMON_ARGUMENTS = frozenset(
    {"num_classes", "in_channels", "image_size", "norm_layer", "placement", "base_norm_layer"}
)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    norm_layer: NormFactory | None,
    placement: PlacementSpec | None = None,
    base_norm_layer: NormFactory | None = None,
    **size_kwargs: Any,
) -> nn.Module:
    """Build the model registered as ``name`` in :data:`MODELS`.

    Args:
        name: a name registered in ``MODELS`` (``shallow_cnn``, ``densenet40``, ...).
        num_classes: number of output logits.
        in_channels: channels of the input images.
        image_size: side of the square input images; passed to the models that need it (the
            ViT's patch grid), the convolutional models work at any size.
        norm_layer: factory ``num_features -> nn.Module`` of the norm under test; ``None``
            builds the baseline model.
        placement: where the tested norm goes (see :class:`Placement`); ``None`` takes the
            model's default (``"all"`` for the CNNs, ``"patch"`` for the ViT).
        base_norm_layer: factory for the norm sites that do not get the tested norm (default
            ``nn.BatchNorm2d``); only for models with norm sites.
        **size_kwargs: the model's own size arguments (``widths``, ``depth``, ``embed_dim``...).

    Raises:
        ValueError: for an unknown name, or an argument the model does not take.
    """
    builder = MODELS.get(name)
    accepted = inspect.signature(builder).parameters
    arguments: dict[str, Any] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "norm_layer": norm_layer,
    }
    if "image_size" in accepted:
        arguments["image_size"] = image_size
    if placement is not None:
        arguments["placement"] = placement
    if base_norm_layer is not None:
        if "base_norm_layer" not in accepted:
            raise ValueError(
                f"model {name!r} has no norm sites, so base_norm_layer does not apply; drop it"
            )
        arguments["base_norm_layer"] = base_norm_layer
    size_arguments = sorted(set(accepted) - _COMMON_ARGUMENTS)
    unknown = sorted(set(size_kwargs) - set(size_arguments))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take {', '.join(unknown)}; its size arguments are: "
            f"{', '.join(size_arguments) or 'none'}"
        )
    return builder(**arguments, **size_kwargs)
