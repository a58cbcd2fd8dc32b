"""A method's norm inside a registered model or generator: how tasks build networks under test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from contextnorm.config import ConfigError, ExperimentConfig, MethodConfig
from contextnorm.methods import METHODS, NormMethod
from contextnorm.models import build_generator, build_model
from contextnorm.registry import UnknownNameError


class LayerRecorder:
    """A norm factory that remembers the layers it builds: a model's tested layers, in order."""

    def __init__(self, factory: Callable[[int], nn.Module]) -> None:
        self.factory = factory
        self.layers: list[nn.Module] = []

    def __call__(self, num_features: int) -> nn.Module:
        layer = self.factory(num_features)
        self.layers.append(layer)
        return layer


@dataclass
class Network:
    """A model and the norm layers under test inside it (forward order for the shipped models)."""

    model: nn.Module
    tested_layers: list[nn.Module]


def method_location(config: ExperimentConfig, index: int) -> str:
    """How messages name ``config.methods[index]``: ``methods[1] (cn)``."""
    return f"methods[{index}] ({config.methods[index].display_name})"


def get_method(name: str, where: str) -> NormMethod:
    """The registered method ``name``; a ConfigError naming ``where`` if there is none."""
    try:
        return METHODS.get(name)
    except UnknownNameError as error:
        raise ConfigError(f"{where}: {error}") from None


def norm_factory(
    config: ExperimentConfig, index: int, num_contexts: int
) -> Callable[[int], nn.Module]:
    """The factory ``num_features -> layer`` of ``config.methods[index]`` with K contexts."""
    method: MethodConfig = config.methods[index]
    where = method_location(config, index)
    return get_method(method.name, where).norm_factory(num_contexts, method.options, where=where)


def build_network(
    config: ExperimentConfig,
    index: int,
    *,
    num_contexts: int,
    num_classes: int,
    in_channels: int,
    image_size: int,
    **model_arguments: Any,
) -> Network:
    """The model of ``config.model`` with the norm of ``config.methods[index]`` where it goes.

    Args:
        config: the experiment.
        index: which method.
        num_contexts: K of the context layers (and the mixtures' default component count).
        num_classes, in_channels, image_size: what the data give the model.
        **model_arguments: further arguments a task passes to the model builder.

    Raises:
        ConfigError: an unknown method or option, a model option the model does not take, or a
            placement that puts no tested norm into the model.
    """
    return _build_with_norms(
        config,
        index,
        num_contexts,
        lambda **norms: build_model(
            config.model.name,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            **norms,
            **model_arguments,
            **config.model.options,
        ),
    )


def build_generator_network(
    config: ExperimentConfig,
    index: int,
    *,
    num_contexts: int,
    out_channels: int,
    image_size: int,
) -> Network:
    """The generator of ``config.model`` (a name in ``GENERATORS``) with the method's norm.

    Raises:
        ConfigError: as :func:`build_network`, for a generator.
    """
    return _build_with_norms(
        config,
        index,
        num_contexts,
        lambda **norms: build_generator(
            config.model.name,
            out_channels=out_channels,
            image_size=image_size,
            **norms,
            **config.model.options,
        ),
    )


def _build_with_norms(
    config: ExperimentConfig,
    index: int,
    num_contexts: int,
    build: Callable[..., nn.Module],
) -> Network:
    """``build(norm_layer=..., placement=..., base_norm_layer=...)`` with the method's norm."""
    where = method_location(config, index)
    recorder = LayerRecorder(norm_factory(config, index, num_contexts))
    model_config = config.model
    base_norm = None
    if model_config.base_norm is not None:
        base_method = get_method(model_config.base_norm, "model.base_norm")
        base_norm = base_method.norm_factory(num_contexts, {}, where="model.base_norm")
    try:
        model = build(
            norm_layer=recorder, placement=model_config.placement, base_norm_layer=base_norm
        )
    except UnknownNameError as error:
        raise ConfigError(f"model.name: {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model ({model_config.name}) for {where}: {error}") from error
    if not recorder.layers:
        raise ConfigError(
            f"model.placement={model_config.placement!r} puts no tested norm into "
            f"{model_config.name}; choose a placement the model supports"
        )
    return Network(model, recorder.layers)
