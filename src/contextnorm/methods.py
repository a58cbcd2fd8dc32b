"""The normalization methods an experiment can compare, by name: the :data:`METHODS` registry.

Each entry turns the experiment's number of contexts K and the method's options into a *norm
factory* ``num_features -> nn.Module`` that the models call at every place the tested norm
goes. Options are checked against the layer's signature before anything is built, so a
misspelt option fails with the list of valid ones. Register a method of your own with
``METHODS.register("name", NormMethod(layer, ...), summary="...")``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import contextnorm as cn
from contextnorm.config import ConfigError
from contextnorm.registry import Registry


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm over every axis but the channel axis 1: (N, C), (N, C, L) or (N, C, H, W) inputs.

    The models call norms on images, feature maps and channel-first tokens alike; the built-in
    classes each accept one rank, while the computation is the same for all.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                "BatchNorm expects a tensor (N, C, ...) with at least 2 dims, "
                f"got shape {tuple(input.shape)}"
            )


def layer_norm(num_features: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """LayerNorm of a convnet: one group over all channels and positions of each sample."""
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine)


@dataclass(frozen=True)
class NormMethod:
    """A registered normalization method.

    Attributes:
        layer: class or function ``layer(num_features, [K,] **options) -> nn.Module``.
        counted: whether the layer takes K as ``num_contexts`` (contexts, mixture components
            or modes).
        fixed_options: options this entry sets itself (e.g. the ACN update mode).
    """

    layer: Callable[..., nn.Module]
    counted: bool = False
    fixed_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def uses_context(self) -> bool:
        """Whether the layer needs each sample's context id (CN, CN-X, CN-E)."""
        return bool(getattr(self.layer, "uses_context", False))

    def option_names(self) -> list[str]:
        """The options a config may set for this method."""
        parameters = list(inspect.signature(self.layer).parameters)
        # The first parameter is the channel count, which the model supplies at each site.
        return [name for name in parameters[1:] if name not in self.fixed_options]

    def norm_factory(
        self, num_contexts: int, options: Mapping[str, Any], *, where: str
    ) -> Callable[[int], nn.Module]:
        """The factory ``num_features -> layer`` for an experiment with ``num_contexts`` contexts.

        Args:
            num_contexts: K of the experiment; it sets the layer's number of contexts (and, for
                the unsupervised mixtures, the default number of components).
            options: the method's options from the config.
            where: the config location of ``options``, for error messages.

        Raises:
            ConfigError: an unknown option, or a context count that disagrees with K.
        """
        valid = self.option_names()
        unknown = [key for key in options if key not in valid]
        if unknown:
            raise ConfigError(
                f"{where}: the method has no option {unknown[0]!r}; "
                f"valid options: {', '.join(valid)}"
            )
        arguments = {**self.fixed_options, **options}
        if self.counted:
            given = arguments.setdefault("num_contexts", num_contexts)
            if self.uses_context and given != num_contexts:
                raise ConfigError(
                    f"{where}: num_contexts={given!r} disagrees with "
                    f"contexts.num_contexts={num_contexts}; a context layer needs one slot per "
                    "context, so drop the option or change contexts.num_contexts"
                )

        def build(num_features: int) -> nn.Module:
            return self.layer(num_features, **arguments)

        return build


METHODS: Registry[NormMethod] = Registry("method")
"""Normalization methods by name (``methods:`` in a config)."""

METHODS.register("bn", NormMethod(BatchNorm), summary="BatchNorm (the baseline)")
METHODS.register(
    "ln", NormMethod(layer_norm), summary="LayerNorm of convnets: GroupNorm with one group"
)
METHODS.register(
    "cn",
    NormMethod(cn.ContextNorm, counted=True),
    summary="Context Normalization: batch statistics per context",
)
METHODS.register(
    "cnx",
    NormMethod(cn.ContextNormX, counted=True),
    summary="CN-X: learned statistics per context",
)
METHODS.register(
    "cne",
    NormMethod(cn.ContextNormE, counted=True),
    summary="CN-E: statistics from an encoding of the context",
)
METHODS.register(
    "acn",
    NormMethod(cn.AdaptiveContextNorm, counted=True),
    summary="Adaptive Context Normalization: learned mixture, the layer's default update "
    "(online EM)",
)
METHODS.register(
    "acn-momentum",
    NormMethod(cn.AdaptiveContextNorm, counted=True, fixed_options={"update": "momentum"}),
    summary="Adaptive Context Normalization: learned mixture, momentum (online EM) updates",
)
METHODS.register(
    "acn-gradient",
    NormMethod(cn.AdaptiveContextNorm, counted=True, fixed_options={"update": "gradient"}),
    summary="Adaptive Context Normalization: learned mixture, gradient updates",
)
METHODS.register(
    "mixnorm",
    NormMethod(cn.MixtureNorm, counted=True),
    summary="Mixture Normalization: EM on each batch",
)
METHODS.register(
    "modenorm",
    NormMethod(cn.ModeNorm, counted=True),
    summary="Mode Normalization: gated batch statistics",
)
METHODS.register(
    "switchnorm",
    NormMethod(cn.SwitchNorm),
    summary="Switchable Normalization: learned mix of BN, LN and IN",
)
