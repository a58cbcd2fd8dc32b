"""Training and evaluation on Lightning: the modules, data, callbacks and the method registry.

* :class:`ContextModule`: base LightningModule (preprocessing, context routing, optimiser);
  subclass it for a new task. :class:`ClassificationModule` is the papers' classification task.
* :class:`ContextDataModule` / :class:`ContextSplit`: batches of (uint8 images, labels, contexts).
* :func:`build_trainer`: the Trainer of one run (loggers, checkpoints, early stopping, seeding).
* :data:`METHODS` / :func:`get_method`: normalization methods by name, as norm factories.
"""

from contextnorm.training.activations import ActivationSample, capture_activations
from contextnorm.training.callbacks import AtomicCheckpointIO, EpochHistory, EpochSeeding
from contextnorm.training.data import ContextDataModule, ContextSplit
from contextnorm.training.methods import METHODS, BatchNorm, NormMethod, get_method, layer_norm
from contextnorm.training.module import ClassificationModule, ContextModule
from contextnorm.training.preprocess import BatchPreprocess, channel_statistics
from contextnorm.training.trainer import build_trainer, last_checkpoint

__all__ = [
    "METHODS",
    "ActivationSample",
    "AtomicCheckpointIO",
    "BatchNorm",
    "BatchPreprocess",
    "ClassificationModule",
    "ContextDataModule",
    "ContextModule",
    "ContextSplit",
    "EpochHistory",
    "EpochSeeding",
    "NormMethod",
    "build_trainer",
    "capture_activations",
    "channel_statistics",
    "get_method",
    "last_checkpoint",
    "layer_norm",
]
