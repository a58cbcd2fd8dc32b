"""Per-epoch variance of the gradients of each domain's loss: the measurement behind the
"gradient variance evolution" figures of Faye et al. 2023 (the slides: AdaMatch vs AdaMatch +
CN, source and target, max and mean per epoch) and Faye et al. 2024a (Fig. 12).

The sources do not define the quantity; this module measures the following.

* Loss terms: for the source, ``L_source`` (cross-entropy on the labelled source, both views);
  for the target, ``L_target`` (the masked pseudo-label loss) *without* the warm-up weight
  ``mu(t)``, so that early epochs are measured too.
* At every training step, the mini-batch gradient ``g_d = dL_d/dtheta`` of domain d's term
  over every entry ``theta_j`` of every trainable parameter.
* Per epoch and entry, the (population) variance of ``g_{d,j}`` over the epoch's steps: how much
  the stochastic gradient of that weight changes from batch to batch.
* The figure's two numbers per epoch and domain: the maximum and the mean of these variances
  over all entries ``j``.

Cost: one extra backward pass per step for the target term (the source gradient is the
total gradient minus ``mu(t)`` times the target one), none for source-only training.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

STATISTICS = ("max", "mean")
MIN_STEPS = 2
DOMAINS = ("source", "target")


def metric_name(domain: str, statistic: str) -> str:
    """The logged name of one curve, e.g. ``grad_variance/source/max``."""
    return f"grad_variance/{domain}/{statistic}"


class _RunningVariance:
    """Entry-wise mean and variance of a stream of equally shaped vectors (Welford)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.squares: Tensor | None = None

    def add(self, values: Tensor) -> None:
        values = values.detach().double()
        self.count += 1
        if self.mean is None or self.squares is None:
            self.mean, self.squares = values.clone(), torch.zeros_like(values)
            return
        delta = values - self.mean
        self.mean += delta / self.count
        self.squares += delta * (values - self.mean)

    def summary(self) -> tuple[float, float]:
        """(max, mean) over entries of the variance; NaN before two steps were seen."""
        if self.count < MIN_STEPS or self.squares is None:
            return math.nan, math.nan
        variance = self.squares / self.count
        return float(variance.max()), float(variance.mean())


def _flat(gradients: list[Tensor | None], parameters: list[Tensor]) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(gradients, parameters, strict=True)
        ]
    )


class GradientVariance(L.Callback):
    """Logs, per training epoch, the max and mean gradient variance of each domain's loss as
    ``grad_variance/<domain>/<max|mean>`` (definition in the module docstring).

    Works with a module that sets, in every ``training_step``, ``domain_losses`` (``{"source":
    L_source}`` and, for AdaMatch, ``"target": L_target``, both attached to the graph) and
    ``target_weight`` (``mu(t)`` of the step): :class:`contextnorm.tasks.adamatch.AdaMatchModule`.
    Place it before the callback that collects epoch records, so that the values land in the
    same record (a task's callbacks are placed so).

    Raises:
        RuntimeError: at fit start, for several processes (gradients are averaged across them
            before the source term could be separated) or gradient accumulation.
    """

    def __init__(self) -> None:
        self._variances: dict[str, _RunningVariance] = {}
        self._target_gradient: Tensor | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError(
                "GradientVariance measures per-process gradients; run it on one device "
                f"(world size is {trainer.world_size})"
            )
        if trainer.accumulate_grad_batches != 1:
            raise RuntimeError(
                "GradientVariance needs one optimizer step per batch; got "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._variances = {}

    @staticmethod
    def _parameters(pl_module: L.LightningModule) -> list[Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        target = pl_module.domain_losses.get("target")
        self._target_gradient = None
        if target is None:
            return
        parameters = self._parameters(pl_module)
        gradients = torch.autograd.grad(target, parameters, retain_graph=True, allow_unused=True)
        self._target_gradient = _flat(list(gradients), parameters)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Here the gradients are complete and, under mixed precision, already unscaled.
        parameters = self._parameters(pl_module)
        total = _flat([p.grad for p in parameters], parameters)
        source = total
        if self._target_gradient is not None:
            source = total - pl_module.target_weight * self._target_gradient
            self._variances.setdefault("target", _RunningVariance()).add(self._target_gradient)
        self._variances.setdefault("source", _RunningVariance()).add(source)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for domain, running in self._variances.items():
            if running.count < MIN_STEPS:
                # A variance needs two steps; NaN would read as a diverged run.
                continue
            for statistic, value in zip(STATISTICS, running.summary(), strict=True):
                pl_module.log(metric_name(domain, statistic), value, on_epoch=True)
        self._variances = {}
