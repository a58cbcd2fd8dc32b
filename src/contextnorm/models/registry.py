"""Models by name, for configs: the :data:`MODELS` and :data:`GENERATORS` registries.

Register a model of your own with ``@MODELS.register("name")`` on a class or function that
takes ``num_classes``, ``in_channels``, ``norm_layer`` (and, where it applies, ``image_size``,
``placement`` and ``base_norm_layer``) besides its own size arguments; a generator of images,
for the ``generation`` task, with ``@GENERATORS.register("name")`` (see :data:`GENERATORS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from contextnorm.registry import Registry

from .dcgan import DCGANGenerator
from .densenet import DenseNet, densenet40, densenet100
from .placement import NormFactory, PlacementSpec
from .shallow_cnn import ShallowCNN
from .vit import VisionTransformer

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
"""Models by name (``model.name`` in a config)."""

MODELS.register("shallow_cnn", ShallowCNN, summary="Shallow CNN of the Mixture Normalization paper")
MODELS.register("densenet40", densenet40, summary="DenseNet-40 (growth rate 12) for 32x32 images")
MODELS.register("densenet100", densenet100, summary="DenseNet-100 (growth rate 12)")
MODELS.register("densenet", DenseNet, summary="DenseNet of any depth (options: depth, ...)")
MODELS.register("vit", VisionTransformer, summary="Vision Transformer of the Keras example")

GENERATORS: Registry[Callable[..., nn.Module]] = Registry("generator")
"""Image generators by name (``model.name`` in a config of the ``generation`` task).

A generator takes ``out_channels``, ``image_size`` and ``norm_layer`` (and, where it applies,
``placement`` and ``base_norm_layer``) besides its own size arguments, has an int attribute
``latent_dim`` and maps latents (N, latent_dim) to images (N, out_channels, image_size,
image_size) in [-1, 1].
"""

GENERATORS.register("dcgan", DCGANGenerator, summary="DCGAN generator of the papers' GAN")

# Arguments the builders set themselves; they cannot come in as size arguments.
_COMMON_ARGUMENTS = frozenset(
    {
        "num_classes",
        "in_channels",
        "out_channels",
        "image_size",
        "norm_layer",
        "placement",
        "base_norm_layer",
    }
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
    arguments: dict[str, Any] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "norm_layer": norm_layer,
    }
    if "image_size" in inspect.signature(builder).parameters:
        arguments["image_size"] = image_size
    return _build(builder, f"model {name!r}", arguments, placement, base_norm_layer, size_kwargs)


def build_generator(
    name: str,
    *,
    out_channels: int,
    image_size: int,
    norm_layer: NormFactory | None,
    placement: PlacementSpec | None = None,
    base_norm_layer: NormFactory | None = None,
    **size_kwargs: Any,
) -> nn.Module:
    """Build the generator registered as ``name`` in :data:`GENERATORS`.

    Args:
        name: a name registered in ``GENERATORS`` (``dcgan``).
        out_channels: channels of the generated images.
        image_size: side of the square generated images.
        norm_layer, placement, base_norm_layer: as for :func:`build_model`.
        **size_kwargs: the generator's own size arguments (``latent_dim``, ``widths``...).

    Raises:
        ValueError: for an unknown name, or an argument the generator does not take.
    """
    builder = GENERATORS.get(name)
    arguments: dict[str, Any] = {
        "out_channels": out_channels,
        "image_size": image_size,
        "norm_layer": norm_layer,
    }
    return _build(
        builder, f"generator {name!r}", arguments, placement, base_norm_layer, size_kwargs
    )


def _build(
    builder: Callable[..., nn.Module],
    what: str,
    arguments: dict[str, Any],
    placement: PlacementSpec | None,
    base_norm_layer: NormFactory | None,
    size_kwargs: dict[str, Any],
) -> nn.Module:
    """``builder(**arguments, **size_kwargs)`` with the placement and base norm it accepts."""
    accepted = inspect.signature(builder).parameters
    if placement is not None:
        arguments["placement"] = placement
    if base_norm_layer is not None:
        if "base_norm_layer" not in accepted:
            raise ValueError(
                f"{what} has no norm sites, so base_norm_layer does not apply; drop it"
            )
        arguments["base_norm_layer"] = base_norm_layer
    size_arguments = sorted(set(accepted) - _COMMON_ARGUMENTS)
    unknown = sorted(set(size_kwargs) - set(size_arguments))
    if unknown:
        raise ValueError(
            f"{what} does not take {', '.join(unknown)}; its size arguments are: "
            f"{', '.join(size_arguments) or 'none'}"
        )
    return builder(**arguments, **size_kwargs)
