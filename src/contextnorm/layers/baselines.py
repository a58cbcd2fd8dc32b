"""Multi-mode baselines the papers compare against: ModeNorm and SwitchNorm (002 Eq. 12-16).

Both reduce to per-sample statistics, so they run on the same core as CN, in float32 with
autocast disabled, without reading any tensor on the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .base import NormBase, RunningStatsMixin, check_momentum, renamed_count


class _BatchOrRunningMixin(RunningStatsMixin):
    """Weighted batch statistics in training, running ones in eval."""

    momentum: float | None
    training: bool
    _pooled_moments: Any

    def _batch_or_running(
        self, moments: F.Moments, weights: Tensor, positions: int
    ) -> tuple[Tensor, Tensor]:
        """Weighted batch statistics per group in training (updating the running ones), running
        ones in eval."""
        if not self.training and self.track_running_stats:
            return self.running_mean, self.running_var
        mean, var, count = self._pooled_moments(
            moments.mean, moments.var, positions, weights=weights
        )
        if self.training and self.track_running_stats:
            present = count.sum() > 0
            momentum = self._running_momentum(present)
            F.update_running_moments(
                self.running_mean, self.running_var, mean, var, count, momentum
            )
        return mean, var


class ModeNorm(_BatchOrRunningMixin, NormBase):
    r"""Mode Normalization (Deecke et al.): gated batch statistics per mode.

    Gates ``g_k(x_n) = softmax(W pool(x_n) + b)`` (pool: the spatial mean) weigh each
    sample's share in each mode's batch mean and variance; each sample is normalised by
    the gate-weighted mix of the modes' transforms. Running estimates per mode serve
    inference. One shared affine.

    Args:
        num_features: channels ``C``.
        num_contexts: modes ``K`` (mixture modes learned by the gates, not supervised
            contexts; ``num_modes`` is its former name, still accepted with a warning).
        eps, momentum, affine, track_running_stats, device, dtype: as in BatchNorm
            (``momentum=None`` is a cumulative average).
        channel_last: the input is (N, *, C).

    ``forward(x, context=None)`` ignores ``context``, so models can call every norm alike.
    """

    def __init__(
        self,
        num_features: int,
        num_contexts: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_modes: int | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_last, device, dtype)
        self.num_contexts = renamed_count("num_contexts", num_contexts, "num_modes", num_modes)
        self.momentum = check_momentum(momentum, allow_none=True)
        self.gate = nn.Linear(num_features, self.num_contexts, **self._factory)
        self._init_affine((num_features,))
        self._init_running_stats(self.num_contexts, num_features, track_running_stats)

    def reset_parameters(self) -> None:
        """Gates, running statistics and affine parameters back to their start."""
        self.gate.reset_parameters()
        self.reset_running_stats()
        self._reset_affine()

    def forward(self, x: Tensor, context: Any = None) -> Tensor:
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        with F.without_autocast(x):
            moments = F.sample_moments(x3)
            gates = torch.softmax(self.gate(moments.mean.to(self.gate.weight.dtype)), dim=1)
            mean, var = self._batch_or_running(moments, gates.to(moments.mean.dtype), x3.shape[2])
            scale, shift = F.affine_coefficients(mean, var, self.eps, None, self.weight, self.bias)
            return restore(
                F.apply_sample_affine(moments.values, gates @ scale, gates @ shift).to(x.dtype)
            )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_contexts={self.num_contexts}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
            + (", channel_last=True" if self.channel_last else "")
        )


class SwitchNorm(_BatchOrRunningMixin, NormBase):
    r"""Switchable Normalization (Luo et al.): a learned mix of BN, LN and IN statistics.

    Mean and variance are softmax-weighted sums of the instance (per sample and channel),
    layer (per sample) and batch (per channel) statistics, with separate weights for the
    mean and the variance; the batch part uses running estimates in inference. One shared
    affine. Arguments as BatchNorm's (``momentum=None`` is a cumulative average);
    ``forward(x, context=None)`` ignores ``context``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_last: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_last, device, dtype)
        self.momentum = check_momentum(momentum, allow_none=True)
        self.mean_logits = nn.Parameter(torch.zeros(3, **self._factory))
        self.var_logits = nn.Parameter(torch.zeros(3, **self._factory))
        self._init_affine((num_features,))
        self._init_running_stats(1, num_features, track_running_stats)

    def reset_parameters(self) -> None:
        """Mixing weights, running statistics and affine parameters back to their start."""
        nn.init.zeros_(self.mean_logits)
        nn.init.zeros_(self.var_logits)
        self.reset_running_stats()
        self._reset_affine()

    def forward(self, x: Tensor, context: Any = None) -> Tensor:
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        with F.without_autocast(x):
            moments = F.sample_moments(x3)
            instance_mean, instance_var = moments.mean, moments.var
            layer_mean = instance_mean.mean(1, keepdim=True)
            centred = instance_mean - layer_mean
            layer_var = instance_var.addcmul(centred, centred).mean(1, keepdim=True)
            ones = instance_mean.new_ones(x3.shape[0], 1)
            batch_mean, batch_var = self._batch_or_running(moments, ones, x3.shape[2])
            mean_weights = torch.softmax(self.mean_logits, 0)
            var_weights = torch.softmax(self.var_logits, 0)
            mean = (
                mean_weights[0] * instance_mean
                + mean_weights[1] * layer_mean
                + mean_weights[2] * batch_mean
            )
            var = (
                var_weights[0] * instance_var
                + var_weights[1] * layer_var
                + var_weights[2] * batch_var
            )
            scale, shift = F.affine_coefficients(mean, var, self.eps, None, self.weight, self.bias)
            return restore(F.apply_sample_affine(moments.values, scale, shift).to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
            + (", channel_last=True" if self.channel_last else "")
        )
