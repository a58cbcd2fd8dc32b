"""The normalization layers: thin modules over :mod:`contextnorm.functional`.

| this project | class                  | paper names                                             |
|--------------|------------------------|---------------------------------------------------------|
| CN           | ``ContextNorm``        | CN (002)                                                |
| CN-X         | ``ContextNormX``       | CN-X (002), ACN (000), SCB-Norm (004), CN-Channels (003)|
| CN-E         | ``ContextNormE``       | ACN-base (000), SCB-Norm-base (004)                     |
| ACN          | ``AdaptiveContextNorm``| ACN (002), UCB-Norm (004), UAN                          |
| MixNorm      | ``MixtureNorm``        | MN / MixNorm (Kalayeh & Shah)                           |
| ModeNorm     | ``ModeNorm``           | ModeNorm (Deecke et al.)                                |
| SwitchNorm   | ``SwitchNorm``         | SwitchNorm (Luo et al.)                                 |
"""

from .assignment import CheckedContext, check_context
from .baselines import ModeNorm, SwitchNorm
from .context import ContextNorm, ContextNormE, ContextNormX
from .mixture import AdaptiveContextNorm, MixtureNorm
from .routing import ContextualModel, checkpoint, convert, use_context, uses_context
from .surgery import extract_context, recalibrate
from .sync import SyncBatchNorm, convert_sync, revert_sync

__all__ = [
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
    "convert_sync",
    "revert_sync",
    "SyncBatchNorm",
    "extract_context",
    "recalibrate",
]
