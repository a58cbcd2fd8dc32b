"""The papers' models, each taking a norm factory and a placement for the norm under test.

* :class:`ShallowCNN`: the Mixture Normalization paper's Shallow CNN (004 Table IV).
* :class:`DenseNet`, :func:`densenet40`, :func:`densenet100`: CIFAR DenseNets (002 Tables I-IV).
* :class:`VisionTransformer`: the Keras example ViT (002 Table V, 000 Table 1).
* :func:`build_model` / :data:`MODELS`: the same by name, for configs.
"""

from .densenet import DenseNet, densenet40, densenet100
from .placement import (
    PLACEMENT_MODES,
    NormFactory,
    NormSiteModel,
    NormSites,
    Placement,
    PlacementSpec,
)
from .registry import MODELS, build_model
from .shallow_cnn import ShallowCNN
from .vit import VisionTransformer

__all__ = [
    "MODELS",
    "PLACEMENT_MODES",
    "DenseNet",
    "NormFactory",
    "NormSiteModel",
    "NormSites",
    "Placement",
    "PlacementSpec",
    "ShallowCNN",
    "VisionTransformer",
    "build_model",
    "densenet100",
    "densenet40",
]
