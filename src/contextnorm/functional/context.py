"""Functional forms of the supervised context layers and the per-sample context posterior."""

from __future__ import annotations

import torch
from torch import Tensor

from .mixture import diag_gaussian_log_density
from .moments import (
    _channels,
    affine_coefficients,
    apply_sample_affine,
    as_ncl,
    pooled_moments,
    sample_moments,
    update_running_moments,
)


def sample_log_posterior(
    mean: Tensor, var: Tensor, positions: int, context_mean: Tensor, context_var: Tensor, log_prior: Tensor
) -> Tensor:
    """Log posterior (N, K) that a whole sample comes from each context.

    Every activation of the sample is an independent draw from its context's diagonal
    Gaussian, so the log-likelihood is a sum over channels and positions; it only needs the
    sample's moments: ``sum_l (x_l - m)^2 = L * (var + (mean - m)^2)``.
    """
    log_density = diag_gaussian_log_density(mean, context_mean, context_var)
    spread = var @ context_var.reciprocal().t()
    log_joint = positions * (log_density - 0.5 * spread) + log_prior
    return torch.log_softmax(log_joint, dim=1)


def context_norm(
    x: Tensor,
    context: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    prior: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_last: bool = False,
) -> Tensor:
    """Context Normalization (CN) for hard context ids, the functional form of :class:`~contextnorm.ContextNorm`.

    ``context`` is an int64 tensor (N,) of ids in [0, K). ``running_mean``/``running_var``
    (K, C) are updated in place in training when given; ``weight``/``bias`` are (K, C);
    ``prior`` (K,) gives ``lambda_k`` (``None``: no ``1/sqrt(lambda)`` scaling). For the
    module's extras (soft contexts, unknown contexts, estimated priors) use the module.
    """
    table = next((t for t in (running_mean, weight, prior) if t is not None), None)
    if table is None:
        raise ValueError("context_norm needs running_mean, weight or prior to know the number of contexts K")
    x3, restore = as_ncl(x, _channels(x, channel_last), channel_last)
    weights = torch.nn.functional.one_hot(context, table.shape[0]).to(table.dtype)
    moments = None
    if training or running_mean is None:
        moments = sample_moments(x3)
        stats_mean, stats_var, mass = pooled_moments(moments.mean, moments.var, weights, x3.shape[2], context)
        if training and running_mean is not None:
            update_running_moments(running_mean, running_var, stats_mean, stats_var, mass, momentum)
    else:
        stats_mean, stats_var = running_mean, running_var
    gain = None if prior is None else prior.rsqrt().unsqueeze(1)
    scale, shift = affine_coefficients(stats_mean, stats_var, eps, gain, weight, bias)
    return restore(apply_sample_affine(x3, weights @ scale, weights @ shift, moments))


def context_norm_x(
    x: Tensor,
    context: Tensor,
    mean: Tensor,
    std: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    prior: Tensor | None = None,
    eps: float = 1e-5,
    channel_last: bool = False,
) -> Tensor:
    """CN-X for hard context ids: normalise with per-context statistics ``mean``, ``std`` (K, C) given as tensors."""
    x3, restore = as_ncl(x, mean.shape[1], channel_last)
    weights = torch.nn.functional.one_hot(context, mean.shape[0]).to(mean.dtype)
    gain = None if prior is None else prior.rsqrt().unsqueeze(1)
    scale, shift = affine_coefficients(mean, std * std, eps, gain, weight, bias)
    return restore(apply_sample_affine(x3, weights @ scale, weights @ shift))


