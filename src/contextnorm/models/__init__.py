"""The papers' models, each taking a norm factory and a placement for the norm under test.

* :class:`ShallowCNN`: the Shallow CNN of Kalayeh & Shah 2019 (Faye et al. 2024a, Table IV).
* :class:`DenseNet`, :func:`densenet40`, :func:`densenet100`: CIFAR DenseNets (Faye et al.
  2024b, Tables I-IV).
* :class:`VisionTransformer`: the Keras example ViT (Faye et al. 2024b, Table V; 2024c, Table 1).
* :class:`DCGANGenerator`, :class:`DCGANDiscriminator`: the DCGAN of the image-generation
  experiment (Faye et al. 2024a, 2024b, §IV-D).
* :func:`build_model` / :data:`MODELS`, :func:`build_generator` / :data:`GENERATORS`: the same
  by name, for configs.
"""

from .dcgan import DCGANDiscriminator, DCGANGenerator
from .densenet import DenseNet, densenet40, densenet100
from .placement import (
    PLACEMENT_MODES,
    NormFactory,
    NormSiteModel,
    NormSites,
    Placement,
    PlacementSpec,
)
from .registry import GENERATORS, MODELS, build_generator, build_model
from .shallow_cnn import ShallowCNN
from .vit import VisionTransformer

__all__ = [
    "GENERATORS",
    "MODELS",
    "PLACEMENT_MODES",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DenseNet",
    "NormFactory",
    "NormSiteModel",
    "NormSites",
    "Placement",
    "PlacementSpec",
    "ShallowCNN",
    "VisionTransformer",
    "build_generator",
    "build_model",
    "densenet100",
    "densenet40",
]
