"""contextnorm: context-based normalization layers for PyTorch.

Importing the package loads the layers only (they depend on torch alone); the experiment
toolkit lives in the subpackages ``data``, ``models``, ``contexts``, ``training`` and the
``contextnorm`` command line.

Names follow ``METHODS.md``; aliases carry the papers' names so a reader of any of them
finds their layer: ``SCBNorm`` and the 000 paper's ``ACN`` are CN-X here (use
``ContextNormX``), ``SCBNormBase`` is CN-E, ``UCBNorm`` is ACN.
"""

from . import functional
from .layers import (
    AdaptiveContextNorm,
    ContextNorm,
    ContextNormE,
    ContextNormX,
    CheckedContext,
    ContextualModel,
    MixtureNorm,
    ModeNorm,
    SwitchNorm,
    check_context,
    checkpoint,
    convert,
    use_context,
    uses_context,
)

# The papers' names for the same layers.
CN = ContextNorm
CNX = ContextNormX
CNE = ContextNormE
SCBNorm = ContextNormX
SCBNormBase = ContextNormE
UCBNorm = AdaptiveContextNorm
ACN = AdaptiveContextNorm
MixNorm = MixtureNorm

__version__ = "0.1.0"

__all__ = [
    "functional",
    "ContextNorm",
    "ContextNormX",
    "ContextNormE",
    "AdaptiveContextNorm",
    "MixtureNorm",
    "ModeNorm",
    "SwitchNorm",
    "ContextualModel",
    "convert",
    "use_context",
    "uses_context",
    "checkpoint",
    "check_context",
    "CheckedContext",
    "CN",
    "CNX",
    "CNE",
    "SCBNorm",
    "SCBNormBase",
    "UCBNorm",
    "ACN",
    "MixNorm",
]
