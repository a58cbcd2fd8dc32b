"""What every contextnorm layer shares: argument checks, layout, and conversion from BatchNorm."""

from __future__ import annotations

import inspect
import math
import warnings
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as F

_Layer = TypeVar("_Layer", bound="NormBase")

# softplus(_SOFTPLUS_OF_ONE) == 1: the raw value that starts a softplus-positive std at 1.
_SOFTPLUS_OF_ONE = math.log(math.expm1(1.0))


def inverse_softplus(value: Tensor) -> Tensor:
    """The raw parameter whose softplus is ``value`` (> 0), stable for large values."""
    return value + torch.log(-torch.expm1(-value))


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def renamed_count(name: str, value: int | None, old_name: str, old_value: int | None) -> int:
    """The count given as ``name``, or as its former name ``old_name`` with a ``FutureWarning``."""
    if old_value is not None:
        warnings.warn(
            f"{old_name} is renamed {name}; pass {name}={old_value} instead",
            FutureWarning,
            stacklevel=3,
        )
        if value is not None and value != old_value:
            raise ValueError(
                f"{name}={value!r} and {old_name}={old_value!r} disagree; pass {name} alone"
            )
        value = old_value
    if value is None:
        raise TypeError(f"missing the required argument {name}")
    return check_count(name, value)


def check_momentum(momentum: object, allow_none: bool) -> float | None:
    if momentum is None and allow_none:
        return None
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0.0 <= momentum <= 1.0
    ):
        expected = (
            "a float in [0, 1] or None (cumulative average)" if allow_none else "a float in [0, 1]"
        )
        raise ValueError(f"momentum must be {expected}, got {momentum!r}")
    return float(momentum)


class NormBase(nn.Module):
    """Base of the layers: ``num_features``, ``eps``, ``affine``, the input layout, BatchNorm
    conversion.

    Every layer's forward is ``forward(x, context=...)``; layers without contexts ignore
    ``context``, so a model can call any norm the same way. ``device`` and ``dtype`` place the
    parameters and buffers, as PyTorch's factory arguments do.
    """

    uses_context = False
    # Set by contextnorm.convert_sync: batch statistics over the processes of ``process_group``
    # (None: the default group) in training. Class attributes, so that layers pickled before
    # they existed still load.
    synchronized = False
    process_group: dist.ProcessGroup | None = None
    _agreement_checked = False
    # Set by contextnorm.recalibrate while it runs: receives the packed sums (K, 2C + 1) of each
    # batch statistic the layer computes (F.packed_sums), to be accumulated over a data set.
    _statistics_record: Callable[[Tensor], None] | None = None

    def __init__(
        self,
        num_features: int,
        eps: float,
        affine: bool,
        channel_last: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = check_count("num_features", num_features)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = float(eps)
        self.affine = bool(affine)
        self.channel_last = bool(channel_last)
        self._factory = {"device": device, "dtype": dtype}

    def _init_affine(self, shape: tuple[int, ...]) -> None:
        if self.affine:
            self.weight = nn.Parameter(torch.ones(shape, **self._factory))
            self.bias = nn.Parameter(torch.zeros(shape, **self._factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _reset_affine(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @classmethod
    def from_batchnorm(
        cls: type[_Layer], bn: nn.modules.batchnorm._BatchNorm, *args: Any, **options: Any
    ) -> _Layer:
        """A layer of this class that starts from what ``bn`` learned (see
        :func:`contextnorm.convert`).

        Carries over ``eps``, ``momentum``, ``affine``, ``track_running_stats`` (where this
        class has them), the device, the dtype and the ``training`` flag.
        """
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ValueError(
                f"{bn.__class__.__name__} has not seen an input yet, so its number of features is "
                "unknown; "
                "run one forward pass through the model before converting it"
            )
        accepted = inspect.signature(cls).parameters
        for name in ("eps", "momentum", "affine", "track_running_stats"):
            if name in accepted and name not in options:
                options[name] = getattr(bn, name)
        reference = bn.weight if bn.weight is not None else bn.running_mean
        if reference is not None:
            for name, value in (("device", reference.device), ("dtype", reference.dtype)):
                if name in accepted and name not in options:
                    options[name] = value
        layer = cls(bn.num_features, *args, **options)
        if reference is not None and "dtype" not in accepted:
            layer = layer.to(device=reference.device, dtype=reference.dtype)
        layer.train(bn.training)
        with torch.no_grad():
            if layer.affine and bn.affine:
                layer.weight.copy_(bn.weight.expand_as(layer.weight))
                layer.bias.copy_(bn.bias.expand_as(layer.bias))
            if bn.running_mean is not None:
                layer._load_batch_statistics(bn.running_mean, bn.running_var)
        return layer

    def _load_batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        """Start from BatchNorm's running statistics (C,); layers without such state ignore them."""

    def _statistics_group(self) -> dist.ProcessGroup | None:
        """The process group whose batches share this call's statistics (``None``: this batch).

        Only a converted layer (:func:`contextnorm.convert_sync`) in training mode synchronises,
        as ``nn.SyncBatchNorm``: eval mode runs no collective. Reads no tensor.
        """
        if not (self.synchronized and self.training):
            return None
        return active_group(self.process_group)

    def _pooled_moments(
        self,
        mean: Tensor,
        var: Tensor,
        positions: int,
        *,
        weights: Tensor | None = None,
        ids: Tensor | None = None,
        num_groups: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`~contextnorm.functional.pooled_moments` of this batch or of every process's.

        Synchronised, the first call checks once that every process's layer has the same
        number of channels and groups (one small all-reduce), then each call all-reduces the
        groups' sums once (and their gradients once in the backward).
        """
        if self._statistics_record is not None:
            self._statistics_record(F.packed_sums(mean, var, positions, weights, ids, num_groups))
        group = self._statistics_group()
        if group is None:
            return F.pooled_moments(
                mean, var, positions, weights=weights, ids=ids, num_groups=num_groups
            )
        groups = num_groups if ids is not None else weights.shape[1]  # type: ignore[union-attr]
        check_agreement(self, group, groups, mean.device)
        return F.synced_pooled_moments(
            mean, var, positions, group, weights=weights, ids=ids, num_groups=num_groups
        )


class RunningStatsMixin:
    """BatchNorm's running estimates for a stack of G groups (G, C)."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def _init_running_stats(
        self, groups: int, num_features: int, track: bool, count_per_group: bool = False
    ) -> None:
        """``count_per_group``: count batches per group (CN's contexts need not appear in every
        batch)."""
        self.track_running_stats = bool(track)
        if track:
            factory = self._factory  # type: ignore[attr-defined]
            device = factory["device"]
            self.register_buffer("running_mean", torch.zeros(groups, num_features, **factory))
            self.register_buffer("running_var", torch.ones(groups, num_features, **factory))
            shape = (groups,) if count_per_group else ()
            batches = torch.zeros(shape, dtype=torch.long, device=device)
            self.register_buffer("num_batches_tracked", batches)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running estimates back to mean 0, variance 1, no batch counted (parameters untouched)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def _load_batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        if self.track_running_stats:
            self.running_mean.copy_(mean.expand_as(self.running_mean))
            self.running_var.copy_(var.expand_as(self.running_var))

    def _running_momentum(self, present: Tensor) -> float | Tensor:
        """Count the batch for the groups ``present`` (K,) and return the update's momentum."""
        momentum = self.momentum  # type: ignore[attr-defined]
        return F.running_rate(self.num_batches_tracked, present, momentum, self.running_mean.dtype)


def active_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``process_group`` (``None``: the default group) if it is initialised and has more than one
    process, else ``None``: a world of one runs no collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def check_agreement(
    layer: nn.Module, group: dist.ProcessGroup, groups: int | None, device: torch.device
) -> None:
    """Raise on every process if the processes' ``layer`` differ in the sizes they all-reduce.

    Runs once per layer (its first synchronised call; one all-reduce of six integers and a
    host read): a mismatch would otherwise hang the processes or add unrelated statistics.
    """
    if layer._agreement_checked:
        return
    values = {
        "num_features": layer.num_features,
        "number of groups (contexts, modes, components)": groups or 0,
        "layer type": zlib.crc32(type(layer).__qualname__.encode()) & 0x7FFFFFFF,
    }
    differ = F.agree_across_processes(values, group, device)
    if differ:
        found = "; ".join(
            f"{name} from {low} to {high}" if name != "layer type" else "the layer classes differ"
            for name, (low, high) in differ.items()
        )
        raise RuntimeError(
            f"{type(layer).__name__}({layer.extra_repr()}) computes its batch statistics over "
            f"{dist.get_world_size(group)} processes, but their layers differ ({found}); build the "
            "same model on every process and call its synchronised layers in the same order"
        )
    layer._agreement_checked = True
