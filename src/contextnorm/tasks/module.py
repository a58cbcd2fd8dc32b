"""What every task's LightningModule shares: context routing, the tested layers, the optimiser.

:class:`TaskModule` is the base of each task's module. A task writes its steps, losses and
metrics in a subclass; the optimiser and learning-rate schedule of ``train:`` come from
:func:`build_optimizer` and :func:`build_scheduler`, which a module with several optimisers
(a GAN) calls once per optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

import contextnorm as cn
from contextnorm.config import TrainConfig

MULTISTEP_MILESTONES = (0.5, 0.75)
MULTISTEP_FACTOR = 0.1


class _NotGiven:
    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()
"""Default of :meth:`TaskModule.forward`'s ``contexts``: no context was passed."""


def run_with_contexts(model: nn.Module, inputs: Any, contexts: Any = NOT_GIVEN) -> Any:
    """``model(inputs)`` with ``contexts`` in scope for its context layers.

    ``contexts`` are int64 ids (N,) in [0, K) (-1 for an unknown context), soft assignments
    (N, K), or ``None``: the whole batch's context is unknown, and context layers use their
    posterior mixture. When no context is given at all, the model runs without one, and a
    context layer inside it raises an error that says how to give one: "no context given" is
    never read as "unknown context".
    """
    if contexts is NOT_GIVEN:
        return model(inputs)
    with cn.use_context(contexts):
        return model(inputs)


class TaskModule(L.LightningModule):
    """Base LightningModule of a task: the model, its tested layers, contexts, the optimiser.

    Args:
        model: the network; a subclass holding several networks passes the one ``forward``
            runs (the others are ordinary attributes).
        tested_layers: the norm layers under test inside the networks, in forward order (the
            runner records the activations of one of them).
        optimization: the experiment's ``train:`` settings (optimiser, learning rate,
            schedule, epochs).
    """

    def __init__(
        self, model: nn.Module, tested_layers: Sequence[nn.Module], optimization: TrainConfig
    ) -> None:
        super().__init__()
        self.model = model
        # A plain list, not a ModuleList: the layers are registered inside the model already.
        self.tested_layers = list(tested_layers)
        self.optimization = optimization

    @property
    def uses_context(self) -> bool:
        """Whether any network of the module holds a context layer."""
        return any(cn.uses_context(child) for child in self.children())

    def forward(self, inputs: torch.Tensor, contexts: Any = NOT_GIVEN) -> Any:
        """The model's output; ``contexts`` as in :func:`run_with_contexts`."""
        return run_with_contexts(self.model, inputs, contexts)

    def configure_optimizers(self) -> Any:
        """One optimiser over every parameter, with the schedule of ``train:``."""
        optimizer = build_optimizer(self.parameters(), self.optimization)
        scheduler = build_scheduler(optimizer, self.optimization)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


def build_optimizer(
    parameters: Iterable[nn.Parameter], settings: TrainConfig, **overrides: Any
) -> torch.optim.Optimizer:
    """The optimiser of ``train.optimizer`` with its learning rate and weight decay.

    Args:
        parameters: what it optimises.
        settings: the ``train:`` section.
        **overrides: optimiser arguments a task sets itself (``betas`` of a GAN's Adam).
    """
    if settings.optimizer == "sgd":
        arguments = {
            "lr": settings.lr,
            "momentum": settings.momentum,
            "nesterov": settings.momentum > 0,
            "weight_decay": settings.weight_decay,
        }
        return torch.optim.SGD(parameters, **{**arguments, **overrides})
    optimizer_class = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    arguments = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    return optimizer_class(parameters, **{**arguments, **overrides})


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch learning-rate schedule of ``train.schedule`` (``None`` when constant)."""
    if settings.schedule == "constant":
        return None
    if settings.schedule == "multistep":
        milestones = [round(share * settings.epochs) for share in MULTISTEP_MILESTONES]
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=milestones, gamma=MULTISTEP_FACTOR
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
