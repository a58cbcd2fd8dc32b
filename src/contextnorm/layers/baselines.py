"""Multi-mode baselines the papers compare against: ModeNorm and SwitchNorm (002 Eq. 12-16).

Both reduce to per-sample statistics, so they run on the same two-pass core as CN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .base import NormBase, RunningStatsMixin, check_count, check_momentum


class _BatchOrRunningMixin(RunningStatsMixin):
    """Weighted batch statistics in training, running ones in eval."""

    momentum: float

    def _batch_or_running(self, moments: F.Moments, weights: Tensor, positions: int) -> tuple[Tensor, Tensor]:
        """Weighted batch statistics per group in training (updating the running ones), running ones in eval."""
        if not self.training and self.track_running_stats:
            return self.running_mean, self.running_var
        mean, var, mass = F.pooled_moments(moments.mean, moments.var, weights, positions)
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            F.update_running_moments(self.running_mean, self.running_var, mean, var, mass, self.momentum)
        return mean, var


class ModeNorm(_BatchOrRunningMixin, NormBase):
    r"""Mode Normalization (Deecke et al.): gated batch statistics per mode.

    Gates ``g_k(x_n) = softmax(W pool(x_n) + b)`` (pool: the spatial mean) weigh each
    sample's share in each mode's batch mean and variance; each sample is normalised by
    the gate-weighted mix of the modes' transforms. Running estimates per mode serve
    inference. One shared affine.
    """

    def __init__(
        self,
        num_features: int,
        num_modes: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_last: bool = False,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_last)
        self.num_modes = check_count("num_modes", num_modes)
        self.momentum = check_momentum(momentum, allow_none=False)
        self.gate = nn.Linear(num_features, num_modes)
        self._init_affine((num_features,))
        self._init_running_stats(num_modes, num_features, track_running_stats)

    def reset_parameters(self) -> None:
        self.gate.reset_parameters()
        self.reset_running_stats()
        self._reset_affine()

    def forward(self, x: Tensor) -> Tensor:
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        moments = F.sample_moments(x3)
        gates = torch.softmax(self.gate(moments.mean.to(self.gate.weight.dtype)), dim=1)
        mean, var = self._batch_or_running(moments, gates, x3.shape[2])
        scale, shift = F.affine_coefficients(mean, var, self.eps, None, self.weight, self.bias)
        return restore(F.apply_sample_affine(x3, gates @ scale, gates @ shift, moments))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_modes={self.num_modes}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}"
                + (", channel_last=True" if self.channel_last else ""))


class SwitchNorm(_BatchOrRunningMixin, NormBase):
    r"""Switchable Normalization (Luo et al.): a learned mix of BN, LN and IN statistics.

    Mean and variance are softmax-weighted sums of the instance (per sample and channel),
    layer (per sample) and batch (per channel) statistics, with separate weights for the
    mean and the variance; the batch part uses running estimates in inference. One shared
    affine.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_last: bool = False,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_last)
        self.momentum = check_momentum(momentum, allow_none=False)
        self.mean_logits = nn.Parameter(torch.zeros(3))
        self.var_logits = nn.Parameter(torch.zeros(3))
        self._init_affine((num_features,))
        self._init_running_stats(1, num_features, track_running_stats)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mean_logits)
        nn.init.zeros_(self.var_logits)
        self.reset_running_stats()
        self._reset_affine()

    def forward(self, x: Tensor) -> Tensor:
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        moments = F.sample_moments(x3)
        instance_mean, instance_var = moments
        layer_mean = instance_mean.mean(1, keepdim=True)
        layer_var = (instance_var + (instance_mean - layer_mean) ** 2).mean(1, keepdim=True)
        ones = torch.ones(x3.shape[0], 1, device=x3.device, dtype=instance_mean.dtype)
        batch_mean, batch_var = self._batch_or_running(moments, ones, x3.shape[2])
        mean_weights = torch.softmax(self.mean_logits, 0)
        var_weights = torch.softmax(self.var_logits, 0)
        mean = mean_weights[0] * instance_mean + mean_weights[1] * layer_mean + mean_weights[2] * batch_mean
        var = var_weights[0] * instance_var + var_weights[1] * layer_var + var_weights[2] * batch_var
        scale, shift = F.affine_coefficients(mean, var, self.eps, None, self.weight, self.bias)
        return restore(F.apply_sample_affine(x3, scale, shift, moments))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}" + (", channel_last=True" if self.channel_last else ""))
