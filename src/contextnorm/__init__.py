"""contextnorm: context-based normalization layers for PyTorch.

The package loads the layers (torch alone) on first use of a name below, so that the
``contextnorm`` command starts without importing torch; the experiment toolkit lives in the
subpackages ``tasks`` and ``runner`` (with ``data``, ``models``, ``contexts``) and the
``contextnorm`` command line.

Names follow docs/methods.md; aliases carry the papers' names so a reader of any of them
finds their layer: ``SCBNorm`` and the "ACN" of the Adaptative Context Normalization paper
are CN-X here (use ``ContextNormX``), ``SCBNormBase`` is CN-E, ``UCBNorm`` is ACN.
"""

import importlib
from typing import Any

# The papers' names for the same layers.
_ALIASES = {
    "CN": "ContextNorm",
    "CNX": "ContextNormX",
    "CNE": "ContextNormE",
    "SCBNorm": "ContextNormX",
    "SCBNormBase": "ContextNormE",
    "UCBNorm": "AdaptiveContextNorm",
    "ACN": "AdaptiveContextNorm",
    "MixNorm": "MixtureNorm",
}

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
    "CheckedContext",
    "check_context",
    "checkpoint",
    "convert",
    "convert_sync",
    "revert_sync",
    "SyncBatchNorm",
    "extract_context",
    "recalibrate",
    "use_context",
    "uses_context",
    "CN",
    "CNX",
    "CNE",
    "SCBNorm",
    "SCBNormBase",
    "UCBNorm",
    "ACN",
    "MixNorm",
]


def __getattr__(name: str) -> Any:
    if name == "functional":
        return importlib.import_module(f"{__name__}.functional")
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.layers"), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
