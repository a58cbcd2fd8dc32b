"""Batch statistics over several processes: :func:`convert_sync`, as ``nn.SyncBatchNorm`` does.

Under data parallelism each process normalises with its own shard of the batch. With a few
samples per context per process, per-context statistics are noise; :func:`convert_sync` makes
every layer that uses batch statistics compute them over the batches of all processes of a
group, exactly as one process would on the concatenated batch:

- each layer all-reduces its groups' sufficient statistics once per training forward (about
  ``K * (2C + 1)`` values: counts, sums and sums of squares per context, mode or component),
  and their gradients once in the backward; no activation is gathered
  (:func:`contextnorm.functional.synced_pooled_moments`); ACN all-reduces the
  posterior-weighted sums of every component with the squared weights, the entropy and the
  number of positions (``K * (2C + 2) + 2`` values), and ``2 K C`` gradients
  (:func:`contextnorm.functional.batch_mixture_norm`);
- a process whose batch lacks a context, or holds no sample at all, adds zeros and still joins
  every collective, so nothing hangs;
- every process updates its running statistics (and an estimated prior, and ACN's mixture in
  ``update="momentum"``) from the same reduced statistics, so they stay identical on every
  process and DDP's ``broadcast_buffers`` changes nothing;
- eval mode and a group of one process run no collective (as ``nn.SyncBatchNorm``);
- the first synchronised call of each layer checks, with one small all-reduce, that every
  process's layer has the same number of channels and groups, and raises on every process
  otherwise (instead of hanging or adding unrelated statistics).

MixNorm is refused: its EM fits each batch on positions drawn at random and seeds by
k-means++ on them, which per-process sums cannot reproduce for the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as F
from .base import NormBase, active_group, check_agreement
from .mixture import MixtureNorm

__all__ = ["SyncBatchNorm", "check_synchronisable", "convert_sync", "revert_sync"]

_NO_PROCESS_GROUP = (
    "contextnorm.convert_sync needs an initialised process group: start one with "
    "torch.distributed.init_process_group(backend='nccl' for GPUs or 'gloo' for the CPU) in each "
    "process (torchrun sets the environment it reads; Lightning's DDP strategy starts it itself "
    "and converts through a LayerSync plugin), then convert the model before wrapping it in "
    "DistributedDataParallel"
)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from every process of a group, on any device.

    The same statistics as ``nn.SyncBatchNorm``, computed as the other layers of this package
    synchronise (:func:`contextnorm.functional.synced_pooled_moments`: one all-reduce of
    ``2C + 1`` values forward and backward), so that it also runs on the CPU, where PyTorch's
    layer (and ``DistributedDataParallel`` holding one) refuses to. Without synchronisation
    (eval mode, one process, no process group) it is ``BatchNorm`` for any input rank.
    :func:`convert_sync` puts it in place of every BatchNorm.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as BatchNorm's.
        process_group: the group whose processes share statistics (``None``: the default group).
    """

    _agreement_checked = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"expected an input (N, C, ...) of at least 2 dimensions, got {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        group = self._statistics_group()
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        x3, restore = F.as_ncl(input, self.num_features)
        with F.without_autocast(input):
            moments = F.sample_moments(x3)
            check_agreement(self, group, 1, input.device)
            ones = moments.mean.new_ones(x3.shape[0], 1)
            mean, var, count = F.synced_pooled_moments(
                moments.mean, moments.var, x3.shape[2], group, weights=ones
            )
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                if momentum is None:
                    # The cumulative average, without reading the counter on the host.
                    momentum = self.num_batches_tracked.to(mean.dtype).reciprocal()
                F.update_running_moments(
                    self.running_mean.view(1, -1),
                    self.running_var.view(1, -1),
                    mean,
                    var,
                    count,
                    momentum,
                )
            scale, shift = F.affine_coefficients(mean, var, self.eps, None, self.weight, self.bias)
            n = x3.shape[0]
            y = F.apply_sample_affine(moments.values, scale.expand(n, -1), shift.expand(n, -1))
            return restore(y.to(input.dtype))

    def _statistics_group(self) -> dist.ProcessGroup | None:
        return active_group(self.process_group) if self.training else None


def convert_sync(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every layer of ``module`` that uses batch statistics compute them over all processes.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: call it in every process after
    ``torch.distributed.init_process_group`` and before wrapping the model in
    ``DistributedDataParallel``. ``module`` may be a model or a single layer.

    - CN, ModeNorm, SwitchNorm (its batch part): batch statistics over the group, in training.
    - ACN (both ``update`` modes): the posterior-weighted statistics of every component over
      the group's positions, in training, with the running estimates (in ``"momentum"`` mode,
      the mixture itself) updated from them, the same on every process. The posterior of a
      position still needs only that position and the mixture.
    - CN-X, CN-E have no batch statistics, but their data-dependent start (``data_init``) and an
      estimated prior come from every process's batch, so that all processes start from, and
      keep, the same parameters and buffers.
    - BatchNorm layers (``BatchNorm1d/2d/3d``, lazy ones once materialised) are replaced by
      :class:`SyncBatchNorm`, sharing their parameters and buffers, which also runs on the CPU;
      PyTorch's ``nn.SyncBatchNorm`` layers are left as they are (GPU only).

    Args:
        module: the model, or one layer.
        process_group: the group whose processes share statistics (``None``: the default group).

    Returns:
        ``module``, converted in place; a new :class:`SyncBatchNorm` when ``module`` is itself a
        BatchNorm (as PyTorch's convert returns).

    Raises:
        RuntimeError: no process group is initialised.
        NotImplementedError: ``module`` holds a MixNorm layer, whose per-batch EM (positions
            drawn at random, k-means++ seeds) cannot be computed from per-process sums as one
            process computes it on the whole batch; nothing is converted then. Use ACN, or
            train the MixNorm model on one process.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(_NO_PROCESS_GROUP)
    # Refused before any layer is converted, so that the model is left as it was.
    check_synchronisable(module)
    return _convert(module, process_group)


def check_synchronisable(module: nn.Module) -> None:
    """Raise ``NotImplementedError`` if :func:`convert_sync` cannot synchronise ``module``.

    For checks before training starts (a configuration asking for several processes): the
    message says which layer, why, and what to use instead.
    """
    for layer in module.modules():
        if isinstance(layer, MixtureNorm):
            raise NotImplementedError(_MIXNORM_REFUSED.format(layer=layer.extra_repr()))


_MIXNORM_REFUSED = (
    "convert_sync cannot synchronise MixtureNorm ({layer}): each training batch's mixture is "
    "fitted by EM on at most max_positions positions drawn at random from the batch, seeded "
    "by k-means++ on those positions, and neither the draw nor the seeds of one process on the "
    "whole batch can be reproduced from per-process sums without gathering every process's "
    "activations. Use AdaptiveContextNorm (update='momentum' is its online-EM counterpart, and "
    "is synchronised exactly), or train the MixtureNorm model on one process"
)


def _convert(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    if isinstance(module, NormBase):
        module.synchronized = True
        module.process_group = group
        module._agreement_checked = False
        return module
    converted = module
    if isinstance(module, SyncBatchNorm):
        module.process_group = group
        module._agreement_checked = False
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, nn.SyncBatchNorm
    ):
        converted = _sync_batchnorm(module, group)
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, group))
    return converted


def _sync_batchnorm(
    bn: nn.modules.batchnorm._BatchNorm, group: dist.ProcessGroup | None
) -> SyncBatchNorm:
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(
            f"{type(bn).__name__} has not seen an input yet, so its number of features is unknown; "
            "run one forward pass through the model before converting it"
        )
    synced = SyncBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, group
    )
    for name in ("weight", "bias"):
        setattr(synced, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(synced, name, getattr(bn, name))
    synced.train(bn.training)
    if hasattr(bn, "qconfig"):
        synced.qconfig = bn.qconfig
    # Kept outside the module tree, for revert_sync to put back (a model's code may hold it).
    object.__setattr__(synced, "_replaced", bn)
    return synced


def revert_sync(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync`: each layer computes statistics of its own process's batch again.

    Every :class:`SyncBatchNorm` that :func:`convert_sync` put in place gives way to the
    BatchNorm it replaced (the same object, with the current parameters and buffers); the
    other layers stop synchronising. Returns ``module`` (or the restored BatchNorm when
    ``module`` is one). Lightning's ``LayerSync.revert`` contract.
    """
    if isinstance(module, NormBase):
        module.synchronized = False
        module.process_group = None
        return module
    reverted = module
    original = getattr(module, "_replaced", None)
    if isinstance(module, SyncBatchNorm) and original is not None:
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(original, name, getattr(module, name))
        original.train(module.training)
        reverted = original
    for name, child in module.named_children():
        reverted.add_module(name, revert_sync(child))
    return reverted
