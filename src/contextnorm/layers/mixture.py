"""Unsupervised mixture layers: ACN (learned mixture) and the MixNorm baseline (EM per batch).

Both model the channel vector of each position as a draw from a K-component diagonal
Gaussian mixture and normalise with the posterior-weighted transform of 004 Eq. 7-9
(:func:`contextnorm.functional.point_mixture_affine`). They differ in where the mixture
comes from: ACN learns it (by gradient or by an online-EM momentum update), MixNorm fits it
to every training batch with k-means++ seeding and a few EM steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from .. import functional as F
from .base import _SOFTPLUS_OF_ONE, NormBase, RunningStatsMixin, check_count, check_momentum, inverse_softplus

__all__ = ["AdaptiveContextNorm", "MixtureNorm"]

_UPDATE_MODES = ("gradient", "momentum")


class _PositionMixtureBase(NormBase):
    """The (positions, channels) view and the final affine shared by the mixture layers."""

    def __init__(self, num_features: int, num_components: int, eps: float, momentum: float, affine: bool, channel_last: bool) -> None:
        super().__init__(num_features, eps, affine, channel_last)
        self.num_components = check_count("num_components", num_components)
        self.momentum = check_momentum(momentum, allow_none=False)
        self._init_affine((num_features,))

    def forward(self, x: Tensor) -> Tensor:
        x3, restore = F.as_ncl(x, self.num_features, self.channel_last)
        points = F.position_matrix(x3)
        if points.dtype in (torch.float16, torch.bfloat16):
            points = points.float()
        normalized = self._normalize(F.centre_points(points)).to(x.dtype)
        n, c, length = x3.shape
        return restore(normalized.reshape(n, length, c).transpose(1, 2))

    def _normalize(self, points: F.CentredPoints) -> Tensor:
        """The normalised and affine-transformed points (P, C)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"{self.num_features}", f"num_components={self.num_components}", f"eps={self.eps}",
                 f"momentum={self.momentum}", *self._extra_repr_parts(), f"affine={self.affine}"]
        if self.channel_last:
            parts.append("channel_last=True")
        return ", ".join(parts)

    def _extra_repr_parts(self) -> list[str]:
        return []


class AdaptiveContextNorm(_PositionMixtureBase):
    r"""Adaptive Context Normalization (ACN; UCB-Norm in 004): a learned Gaussian mixture, no context ids.

    The mixture ``{lambda_k, m_k, diag(Sigma_k)}`` gives each position's posterior
    ``tau_k`` over its channel vector (004 Eq. 5), computed in log space. Training
    normalises with posterior-weighted batch statistics; inference with the mixture's own
    parameters (004 Eq. 15).

    Args:
        num_features: channels ``C``.
        num_components: mixture components ``K``.
        update: how the mixture parameters are learned (004 Alg. 2): ``"gradient"``, as
            network weights by backpropagation; or ``"momentum"``, an online-EM update after
            each training batch: ``lambda <- (1 - momentum) lambda + momentum mean(tau)``,
            and likewise the weighted batch means and variances into ``m_k, Sigma_k``
            (PyTorch's momentum convention: the weight of the new value). The mixture
            is then a set of buffers, and inference uses the statistics training saw.
        eps, momentum, affine, channel_last: as in BatchNorm; the affine is shared.

    The means start at random (seeded by torch's generator), since identical components
    would receive identical gradients and never separate.
    """

    def __init__(
        self,
        num_features: int,
        num_components: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        update: str = "momentum",
        channel_last: bool = False,
    ) -> None:
        super().__init__(num_features, num_components, eps, momentum, affine, channel_last)
        if update not in _UPDATE_MODES:
            raise ValueError(f"update must be one of {_UPDATE_MODES}, got {update!r}")
        self.update = update
        shapes = {"prior_logits": (num_components,), "component_mean": (num_components, num_features),
                  "component_raw_std": (num_components, num_features)}
        for name, shape in shapes.items():
            if update == "gradient":
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            else:
                self.register_buffer(name, torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.prior_logits.zero_()
            self.component_mean.normal_()
            self.component_raw_std.fill_(_SOFTPLUS_OF_ONE)
        self._reset_affine()

    def reset_running_stats(self) -> None:
        """In momentum mode the mixture is the running state; start it over."""
        if self.update == "momentum":
            self.reset_parameters()

    def _load_batch_statistics(self, mean: Tensor, var: Tensor) -> None:
        spread = var.clamp_min(self.eps).sqrt()
        # Components start around BatchNorm's Gaussian, one standard deviation apart.
        self.component_mean.copy_(mean + spread * torch.randn_like(self.component_mean))
        self.component_raw_std.copy_(inverse_softplus(spread).expand_as(self.component_raw_std))

    @property
    def prior(self) -> Tensor:
        return torch.softmax(self.prior_logits, 0)

    @property
    def component_var(self) -> Tensor:
        return nnf.softplus(self.component_raw_std).square()

    def posterior(self, points: F.CentredPoints) -> Tensor:
        """``tau`` (P, K): each position's posterior over the components, in log space."""
        log_joint = F.point_log_density(points, self.component_mean, self.component_var + self.eps)
        return torch.softmax(log_joint + torch.log_softmax(self.prior_logits, 0), dim=1)

    def _normalize(self, points: F.CentredPoints) -> Tensor:
        responsibility = self.posterior(points)
        if self.training:
            mean, var, _ = F.point_moments(points, responsibility)
            if self.update == "momentum":
                self._momentum_update(responsibility, mean, var)
        else:
            mean, var = self.component_mean, self.component_var
        return F.point_mixture_affine(
            points, responsibility, mean, var, self.eps, self.prior.rsqrt(), self.weight, self.bias
        )

    def _momentum_update(self, responsibility: Tensor, mean: Tensor, var: Tensor) -> None:
        with torch.no_grad():
            rate = self.momentum
            prior = torch.lerp(self.prior, responsibility.mean(0), rate)
            self.prior_logits.copy_(prior.clamp_min(1e-12).log())
            self.component_mean.lerp_(mean.to(self.component_mean), rate)
            new_var = torch.lerp(self.component_var, var.to(self.component_mean), rate)
            self.component_raw_std.copy_(inverse_softplus(new_var.clamp_min(self.eps).sqrt()))

    def _extra_repr_parts(self) -> list[str]:
        return [f"update={self.update!r}"]


class MixtureNorm(RunningStatsMixin, _PositionMixtureBase):
    r"""Mixture Normalization (MixNorm; Kalayeh & Shah), the baseline the papers compare against.

    Every training batch: fit a K-component diagonal GMM to the positions' channel vectors
    (k-means++ seeding, ``em_steps`` EM iterations, on at most ``max_positions`` positions
    drawn at random), then normalise with the posterior-weighted batch statistics of all
    positions. The fitted components are matched to the running ones (greedily, by
    distance between means) so the running estimates that serve inference track the same
    component across batches. The posterior is treated as a constant: gradients flow
    through the weighted statistics, not through EM.
    """

    def __init__(
        self,
        num_features: int,
        num_components: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        em_steps: int = 3,
        max_positions: int = 2048,
        channel_last: bool = False,
    ) -> None:
        super().__init__(num_features, num_components, eps, momentum, affine, channel_last)
        self.em_steps = check_count("em_steps", em_steps)
        self.max_positions = check_count("max_positions", max_positions)
        self._init_running_stats(num_components, num_features, track=True)
        self.register_buffer("running_prior", torch.full((num_components,), 1.0 / num_components))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.running_prior.fill_(1.0 / self.num_components)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()

    def _normalize(self, points: F.CentredPoints) -> Tensor:
        if not self.training:
            log_prior = self.running_prior.clamp_min(1e-12).log()
            log_joint = F.point_log_density(points, self.running_mean, self.running_var + self.eps)
            return F.point_mixture_affine(
                points, torch.softmax(log_joint + log_prior, dim=1), self.running_mean, self.running_var,
                self.eps, self.running_prior.clamp_min(1e-12).rsqrt(), self.weight, self.bias,
            )
        responsibility = self._fit_batch(points)
        mean, var, mass = F.point_moments(points, responsibility)
        prior = mass / mass.sum()
        self._update_running(mean, var, prior)
        return F.point_mixture_affine(
            points, responsibility, mean, var, self.eps, prior.clamp_min(1e-12).rsqrt(), self.weight, self.bias
        )

    def _fit_batch(self, points: F.CentredPoints) -> Tensor:
        """Posterior (P, K) of every position under a GMM fitted to (a subsample of) the batch."""
        with torch.no_grad():
            values = points.values.detach()
            sample = values
            if values.shape[0] > self.max_positions:
                sample = values[torch.randperm(values.shape[0], device=values.device)[: self.max_positions]]
            if not bool(torch.isfinite(sample).all()):
                raise FloatingPointError(
                    "MixtureNorm received non-finite activations, so no mixture can be fitted: the "
                    "network has diverged upstream (lower the learning rate, or check the input)"
                )
            log_prior, mean, var = F.fit_diag_gmm(sample + points.reference, self.num_components, self.em_steps, self.eps)
            if self.num_batches_tracked > 0:
                order = F.match_components(mean, self.running_mean, self.running_var + self.eps)
                log_prior, mean, var = log_prior[order], mean[order], var[order]
            detached = F.CentredPoints(values, points.squares.detach(), points.reference)
            return torch.softmax(F.point_log_density(detached, mean, var) + log_prior, dim=1)

    def _update_running(self, mean: Tensor, var: Tensor, prior: Tensor) -> None:
        with torch.no_grad():
            first = bool(self.num_batches_tracked == 0)
            rate = 1.0 if first else self.momentum
            self.running_mean.lerp_(mean.to(self.running_mean), rate)
            self.running_var.lerp_(var.to(self.running_var), rate)
            self.running_prior.lerp_(prior.to(self.running_prior), rate)
            self.num_batches_tracked += 1

    def _extra_repr_parts(self) -> list[str]:
        return [f"em_steps={self.em_steps}", f"max_positions={self.max_positions}"]
