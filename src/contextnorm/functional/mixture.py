"""Position mixtures: Gaussian log-densities, posterior-weighted moments, EM and k-means++.

The mixture layers (ACN, MixNorm) need a posterior per position, so they work on the
(positions, channels) matrix, with matrix products over components.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .moments import affine_coefficients

_LOG_2PI = math.log(2.0 * math.pi)


class CentredPoints(NamedTuple):
    """Points (P, C), one row per position's channel vector, minus a per-channel reference, with their squares.

    The mixture layers need both for the posterior and for the weighted moments; making
    them once serves both. Centring on the batch mean keeps the quadratic expansions of
    ``(x - m)^2`` away from catastrophic cancellation when activations are large.
    """

    values: Tensor
    squares: Tensor
    reference: Tensor


def position_matrix(x: Tensor) -> Tensor:
    """(N, C, L) -> (N * L, C): one row per position (a view when ``x`` is channel-last in memory)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1])


def centre_points(points: Tensor) -> CentredPoints:
    """:class:`CentredPoints` of ``points`` (P, C), centred on their per-channel mean."""
    reference = points.detach().mean(0)
    values = points - reference
    return CentredPoints(values, values * values, reference)


def point_log_density(points: CentredPoints, mean: Tensor, var: Tensor) -> Tensor:
    """Log-density (P, K) of each point under each diagonal Gaussian (K, C).

    The Mahalanobis term is expanded into two matrix products over channels.
    """
    centred_mean = mean - points.reference
    precision = var.reciprocal()
    mahalanobis = (
        points.squares @ precision.t()
        - 2.0 * (points.values @ (centred_mean * precision).t())
        + (centred_mean * centred_mean * precision).sum(1)
    )
    return -0.5 * (mahalanobis.clamp_min(0.0) + var.log().sum(1) + mean.shape[1] * _LOG_2PI)


def diag_gaussian_log_density(points: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Log-density (P, K) of raw points (P, C) under each diagonal Gaussian (K, C)."""
    return point_log_density(centre_points(points), mean, var)


def point_moments(points: CentredPoints, responsibility: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-component mean and biased variance (K, C) under responsibilities (P, K).

    This is 004 Eq. 7-9: ``tauhat_k = tau_k / sum_j tau_k(x_j)``, the mean ``E[tauhat_k x]``
    and the variance ``E[tauhat_k (x - mean_k)^2]``. Also returns the mass (K,) ``sum_j tau_k(x_j)``.
    """
    mass = responsibility.sum(0)
    share = responsibility / mass.clamp_min(torch.finfo(mass.dtype).tiny)
    first = share.t() @ points.values
    second = share.t() @ points.squares
    return first + points.reference, (second - first * first).clamp_min(0.0), mass


def point_mixture_affine(
    points: CentredPoints,
    responsibility: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gain: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """The mixture transform (P, C): ``weight * sum_k tau_k gain_k (x - mean_k) / sqrt(var_k + eps) + bias``.

    ``gain`` (K,) is ``1/sqrt(lambda_k)``. Each point's coefficients are the
    responsibility-weighted sum of the components' (K, C) coefficients; since the
    responsibilities sum to 1, the bias folds into them.
    """
    scale, shift = affine_coefficients(mean - points.reference, var, eps, gain.unsqueeze(1), weight, bias)
    return torch.addcmul(responsibility @ shift, points.values, responsibility @ scale)


def kmeans_plus_plus(points: Tensor, num_components: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): ``num_components`` rows of ``points`` (P, C).

    The seeding is sequential by definition; each step costs one (P, C) distance update.
    Distances are summed in float64: squared distances of large activations overflow float32
    and would turn the sampling probabilities into NaN.
    """
    wide = points.double()
    first = torch.randint(points.shape[0], (1,), device=points.device, generator=generator)
    chosen = [first]
    closest = ((wide - wide[first]) ** 2).sum(1)
    for _ in range(1, num_components):
        total = closest.sum()
        probabilities = closest / total if total > 0 else torch.ones_like(closest)
        index = torch.multinomial(probabilities, 1, generator=generator)
        chosen.append(index)
        closest = torch.minimum(closest, ((wide - wide[index]) ** 2).sum(1))
    return points[torch.cat(chosen)]


def fit_diag_gmm(
    points: Tensor,
    num_components: int,
    steps: int,
    variance_floor: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fit a diagonal Gaussian mixture to points (P, C) by EM after k-means++ seeding.

    Returns ``(log_prior (K,), mean (K, C), var (K, C))``. The E-step is a log-space softmax,
    so far-away points never make every density underflow to zero. A component that loses
    all its points keeps its previous parameters instead of becoming NaN.
    """
    mean = kmeans_plus_plus(points, num_components, generator)
    var = points.var(0, correction=0).clamp_min(variance_floor).expand_as(mean).clone()
    log_prior = torch.full((num_components,), -math.log(num_components), device=points.device, dtype=points.dtype)
    centred = centre_points(points)
    for _ in range(steps):
        log_joint = point_log_density(centred, mean, var) + log_prior
        new_mean, new_var, mass = point_moments(centred, torch.softmax(log_joint, dim=1))
        alive = (mass > 1e-6).unsqueeze(1)
        mean = torch.where(alive, new_mean, mean)
        var = torch.where(alive, new_var.clamp_min(variance_floor), var)
        log_prior = torch.log((mass / mass.sum()).clamp_min(1e-12))
    return log_prior, mean, var


def match_components(mean: Tensor, reference_mean: Tensor, reference_var: Tensor) -> Tensor:
    """Order (K,) that pairs freshly fitted components with reference ones, greedily.

    EM labels components arbitrarily on each batch; running estimates need the same label
    to mean the same component. Pairs are taken closest first, by the squared distance
    between means scaled by the reference variances.
    """
    cost = (((mean.unsqueeze(0) - reference_mean.unsqueeze(1)) ** 2) / reference_var.unsqueeze(1)).sum(2)
    if not bool(torch.isfinite(cost).all()):
        raise FloatingPointError(
            "component means or variances are not finite, so fitted components cannot be matched "
            "to the running ones: the activations have overflowed (the network has diverged)"
        )
    num_components = cost.shape[0]
    order = torch.full((num_components,), -1, dtype=torch.long, device=mean.device)
    for _ in range(num_components):
        flat = int(torch.argmin(cost))
        slot, fitted = divmod(flat, num_components)
        order[slot] = fitted
        cost[slot, :] = float("inf")
        cost[:, fitted] = float("inf")
    return order


