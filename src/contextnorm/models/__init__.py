"""The papers' models, each taking a norm factory and a placement for the norm under test.

* :class:`ShallowCNN`: the Shallow CNN of Kalayeh & Shah 2019 (Faye et al. 2024a, Table IV).
* :class:`DenseNet`, :func:`densenet40`, :func:`densenet100`: CIFAR DenseNets (Faye et al.
  2024b, Tables I-IV).
* :class:`VisionTransformer`: the Keras example ViT (Faye et al. 2024b, Table V; 2024c, Table 1).
* :class:`WideResNet`: the WRN-28-2 of AdaMatch (Faye et al. 2024b, Table VI).
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
from .wide_resnet import WideResNet

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
    "WideResNet",
    "build_model",
    "densenet100",
    "densenet40",
]
