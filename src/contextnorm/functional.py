"""Functional core of the context-normalization layers: pure tensor functions.

Every layer in :mod:`contextnorm.layers` is a thin module over these functions, as
``torch.nn.BatchNorm2d`` sits on ``torch.nn.functional.batch_norm``.

The layers share one computational pattern, which is what keeps them fast whatever the
number of contexts ``K``:

1. one pass over the activations gives per-sample, per-channel moments (N, C);
2. every statistic a layer needs (per context, per mode, BN/LN/IN) is a small weighted
   combination of those moments, computed with matrix products on (N, C) and (K, C)
   tensors, never with a Python loop over contexts;
3. one more pass applies a per-sample affine map ``y = x * scale[n, c] + shift[n, c]``.

The mixture layers (ACN, MixNorm) need a posterior per position, so they work on the
(positions, channels) matrix instead, again with matrix products over components.

Shapes: ``x`` is (N, C), (N, C, *spatial) or, with ``channel_last=True``, (N, *, C).
Internally it is viewed as (N, C, L) without copying where the layout allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "as_ncl",
    "Moments",
    "sample_moments",
    "pooled_moments",
    "affine_coefficients",
    "apply_sample_affine",
    "CentredPoints",
    "position_matrix",
    "centre_points",
    "point_log_density",
    "diag_gaussian_log_density",
    "sample_log_posterior",
    "point_moments",
    "point_mixture_affine",
    "fit_diag_gmm",
    "kmeans_plus_plus",
    "match_components",
    "context_norm",
    "context_norm_x",
]

_LOG_2PI = math.log(2.0 * math.pi)


def as_ncl(x: Tensor, num_features: int, channel_last: bool = False) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``x`` as (N, C, L) and return the view with a function mapping (N, C, L) back.

    Raises a ``ValueError`` naming the expected layout when the channel count is wrong.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    channel_dim = -1 if channel_last and x.dim() > 2 else 1
    if x.shape[channel_dim] != num_features:
        layout = "(N, *, C) with channel_last=True" if channel_last else "(N, C, *spatial)"
        hint = "" if channel_last else "; for token tensors (N, L, C) pass channel_last=True"
        raise ValueError(
            f"expected {num_features} channels at dim {channel_dim} of an input laid out as {layout}, "
            f"got shape {tuple(x.shape)}{hint}"
        )
    if x.shape[0] == 0:
        raise ValueError("input has an empty batch (N = 0): there is nothing to normalise")
    shape = x.shape
    n = shape[0]
    if channel_dim == 1:
        return x.reshape(n, num_features, -1), lambda y: y.reshape(shape)
    return (
        x.reshape(n, -1, num_features).transpose(1, 2),
        lambda y: y.transpose(1, 2).reshape(shape),
    )


class Moments(NamedTuple):
    """Per-sample, per-channel mean and biased variance over positions, each (N, C)."""

    mean: Tensor
    var: Tensor


def sample_moments(x: Tensor) -> Moments:
    """Mean and biased variance of each (sample, channel) of ``x`` (N, C, L) over positions.

    Two plain reductions (a sum and a sum of squares) instead of ``torch.var_mean``, which
    on the CPU costs as much as a whole BatchNorm forward. The variance is
    ``E[x^2] - E[x]^2`` accumulated in float32 (float64 for float64 input): accurate while
    a sample's channel mean is within about 1e3 of its standard deviation.

    When ``x`` requires grad, the moments are returned as fresh leaves: their gradient is
    routed back to ``x`` by :func:`apply_sample_affine`, which must receive them, in one
    fused backward pass instead of autograd's several.
    """
    with torch.no_grad():
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = wide.mean(2)
        var = (torch.einsum("ncl,ncl->nc", wide, wide) / wide.shape[2] - mean * mean).clamp_min(0.0)
    if x.requires_grad:
        mean.requires_grad_()
        var.requires_grad_()
    return Moments(mean, var)


def pooled_moments(
    mean: Tensor, var: Tensor, weights: Tensor, positions: int, ids: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Combine per-sample moments into per-group moments with sample weights.

    ``weights`` (N, K) says how much each sample counts for each group: a one-hot matrix for
    hard contexts, probabilities for soft assignments or ModeNorm's gates, a column of ones
    for BatchNorm. When the weights are one-hot, passing the ids (N,) as well lets the sums
    be scattered instead of multiplied by the (N, K) matrix, which matters for large K.
    Returns the group mean and biased variance (K, C) and the group mass (K,), the number
    of values per channel behind each group (``sum_n w_nk * positions``).

    The variance adds the within-sample variances to the spread of the sample means around
    a per-channel reference; the reference (the batch mean) keeps the subtraction away from
    the cancellation that ``E[x^2] - E[x]^2`` suffers when the mean is large.
    """
    weights = weights.to(mean.dtype)
    sample_mass = weights.sum(0)
    share = weights / sample_mass.clamp_min(torch.finfo(mean.dtype).tiny)
    reference = mean.mean(0).detach()
    centred = mean - reference
    spread = var + centred * centred
    if ids is None:
        group_centred = share.t() @ centred
        group_second = share.t() @ spread
    else:
        sample_share = share.gather(1, ids.unsqueeze(1))
        empty = mean.new_zeros(weights.shape[1], mean.shape[1])
        group_centred = empty.index_add(0, ids, centred * sample_share)
        group_second = empty.index_add(0, ids, spread * sample_share)
    group_var = group_second - group_centred * group_centred
    return group_centred + reference, group_var.clamp_min(0.0), sample_mass * positions


def affine_coefficients(
    mean: Tensor,
    var: Tensor,
    eps: float,
    gain: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` such that ``x * scale + shift == weight * gain * (x - mean) / sqrt(var + eps) + bias``.

    All arguments broadcast against (G, C), where G indexes contexts, components or samples.
    ``gain`` carries the mixture factor ``1/sqrt(lambda_k)`` as a (G, 1) column.
    """
    scale = torch.rsqrt(var + eps)
    if gain is not None:
        scale = scale * gain
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def apply_sample_affine(x: Tensor, scale: Tensor, shift: Tensor, moments: Moments | None = None) -> Tensor:
    """``x * scale + shift`` for ``x`` (N, C, L) and per-sample coefficients (N, C), in ``x``'s dtype.

    ``moments``: the :func:`sample_moments` of ``x`` that ``scale`` and ``shift`` were computed
    from, if any; their gradient reaches ``x`` here. Any use of the moments that should
    carry gradient must flow into ``scale`` or ``shift``.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return _SampleAffine.apply(x, scale, shift, moments)
    return torch.addcmul(shift.to(x.dtype).unsqueeze(-1), x, scale.to(x.dtype).unsqueeze(-1))


class _SampleAffine(torch.autograd.Function):
    """``y = x * scale + shift`` whose backward also carries the gradient of the sample moments.

    With ``m = mean_l x`` and ``v = mean_l x^2 - m^2``, the input gradient is
    ``g * scale + x * (2 dv / L) + (dm - 2 dv m) / L``: two fused passes. ``dm, dv`` come
    from differentiating the small graph ``(m, v) -> (scale, shift)`` inside this backward;
    autograd then continues through that same graph to the layer's parameters.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor, moments: Moments | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, scale, shift)
        ctx.moments = moments
        return torch.addcmul(shift.to(x.dtype).unsqueeze(-1), x, scale.to(x.dtype).unsqueeze(-1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, scale, shift = ctx.saved_tensors
        wide_grad = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        wide_x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        grad_scale = torch.einsum("ncl,ncl->nc", wide_grad, wide_x).to(scale.dtype)
        grad_shift = wide_grad.sum(2).to(shift.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * scale.to(grad.dtype).unsqueeze(-1)
            moment_grads = _moment_grads(ctx.moments, scale, shift, grad_scale, grad_shift)
            if moment_grads is not None:
                positions = x.shape[2]
                grad_mean, grad_var = moment_grads
                slope = 2.0 * grad_var / positions
                offset = grad_mean / positions - slope * ctx.moments.mean
                grad_x.addcmul_(x, slope.to(grad.dtype).unsqueeze(-1)).add_(offset.to(grad.dtype).unsqueeze(-1))
        return grad_x, grad_scale, grad_shift, None


def _moment_grads(
    moments: Moments | None, scale: Tensor, shift: Tensor, grad_scale: Tensor, grad_shift: Tensor
) -> tuple[Tensor, Tensor] | None:
    if moments is None or not moments.mean.requires_grad:
        return None
    outputs = [t for t in (scale, shift) if t.requires_grad]
    grads = [g for t, g in ((scale, grad_scale), (shift, grad_shift)) if t.requires_grad]
    if not outputs:
        return None
    with torch.enable_grad():
        grad_mean, grad_var = torch.autograd.grad(
            outputs, (moments.mean, moments.var), grads, retain_graph=True, allow_unused=True
        )
    if grad_mean is None and grad_var is None:
        return None
    return (
        torch.zeros_like(moments.mean) if grad_mean is None else grad_mean,
        torch.zeros_like(moments.var) if grad_var is None else grad_var,
    )


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


def update_running_moments(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    mass: Tensor,
    momentum: float | Tensor,
) -> None:
    """BatchNorm's running update, per group, for the groups that had data in the batch.

    The variance is stored unbiased (``mass / (mass - 1)``), as BatchNorm does; a group with
    mass 0 keeps its running statistics untouched. ``momentum`` may be a (K,) tensor (the
    cumulative average of ``momentum=None``).
    """
    with torch.no_grad():
        present = (mass > 0).unsqueeze(1)
        correction = (mass / (mass - 1).clamp_min(1e-12)).where(mass > 1, torch.ones_like(mass)).unsqueeze(1)
        rate = momentum.unsqueeze(1) if isinstance(momentum, Tensor) else momentum
        new_mean = running_mean + rate * (batch_mean.detach().to(running_mean.dtype) - running_mean)
        new_var = running_var + rate * ((batch_var.detach() * correction).to(running_var.dtype) - running_var)
        running_mean.copy_(torch.where(present, new_mean, running_mean))
        running_var.copy_(torch.where(present, new_var, running_var))


def _channels(x: Tensor, channel_last: bool) -> int:
    if x.dim() < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}")
    return x.shape[-1] if channel_last and x.dim() > 2 else x.shape[1]
