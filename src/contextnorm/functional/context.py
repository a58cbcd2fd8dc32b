"""The per-sample context posterior of the supervised context layers (000 Eq. 6, 004 Eq. 12-13)."""

from __future__ import annotations

from torch import Tensor


def sample_log_posterior(
    mean: Tensor, var: Tensor, positions: int, context_mean: Tensor, context_var: Tensor, log_prior: Tensor
) -> Tensor:
    """Log posterior (N, K) that a whole sample comes from each context.

    Every activation of the sample is an independent draw from its context's diagonal
    Gaussian (``context_mean``, ``context_var``: (K, C)), so the log-likelihood is a sum over
    channels and positions and needs only the sample's moments (``mean``, ``var``: (N, C)):
    ``sum_l (x_l - mu)^2 = L * (var + (mean - mu)^2)``. The squares are expanded into matrix
    products around the batch's mean, which keeps them accurate far from zero. 004 Eq. 13's
    extra division by K is a typo and is not applied: the posterior sums to 1.
    """
    reference = mean.detach().mean(0)
    centred = mean - reference
    centred_context = context_mean - reference
    precision = context_var.reciprocal()
    spread = (
        var.addcmul(centred, centred) @ precision.t()
        - 2.0 * (centred @ (centred_context * precision).t())
        + (centred_context * centred_context * precision).sum(1)
    ).clamp_min(0.0)
    log_joint = (-0.5 * positions) * (spread + context_var.log().sum(1)) + log_prior
    return log_joint.log_softmax(1)

