"""Position mixtures: Gaussian log-joints, the posterior-weighted transform, EM and k-means++.

The mixture layers (ACN, MixNorm) give every position (one ``(n, l)`` of the input) a
posterior over ``K`` diagonal Gaussian components of its channel vector, so they work on
all positions rather than on per-sample moments. The activations are kept in a
*positions view* ``(B, C, L)``: the layer's ``(N, C, L)`` itself for channel-first maps, or
``(1, C, P)`` over all ``P`` positions when the channels of a position are adjacent in memory
(dense and channel-last inputs), so that every sum over positions is one batched matrix
product and no layout copy is made.

Numerics: everything is computed on ``x - r``, with ``r`` the per-channel batch mean (or, in
eval, a fixed reference), so the quadratic expansion of ``(x - m)^2 / s`` into matrix
products does not cancel catastrophically when activations sit far from zero.

The training transform ([CBN] Eq. 5-9 = [PKN] Eq. 19-21) is a custom autograd function
(:func:`batch_mixture_norm`) whose backward computes the input gradient in a few fused
passes instead of autograd's dozen. Over several processes, the posterior-weighted sums are
all-reduced between the posterior and the coefficients, and the coefficients' gradient
between the output's backward and the posterior's: the fused passes stay as they are.

References:
    [CBN] B. Faye, H. Azzag, M. Lebbah. Cluster-Based Normalization Layer for Neural Networks.
        arXiv:2403.16798v2, 2024.
    [PKN] B. Faye, H. Azzag, M. Lebbah, D. Bouchaffra. Enhancing Neural Network Representations
        with Prior Knowledge-Based Normalization. arXiv:2403.16798v3, 2024.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import native
from .sync import all_reduce_sum

__all__ = [
    "MixtureStats",
    "batch_mixture_norm",
    "channels_inner",
    "component_sums",
    "diag_gaussian_log_density",
    "expand_components",
    "fit_diag_gmm",
    "from_positions_view",
    "kmeans_plus_plus",
    "log_joint",
    "log_joint_coefficients",
    "match_components",
    "mixture_transform",
    "positions_view",
    "sample_positions",
]

_LOG_2PI = math.log(2.0 * math.pi)


class MixtureStats(NamedTuple):
    """What a training batch normalised with, for running estimates and diagnostics (no grad).

    Attributes:
        mean: (K, C) posterior-weighted batch mean of each component ([CBN] Eq. 8-9).
        var: (K, C) posterior-weighted biased batch variance ([CBN] Eq. 8-9), after the floor.
        mass: (K,) ``sum_i tau_k(x_i)``, the positions' posterior mass per component.
        mass_sq: (K,) ``sum_i tau_k(x_i)^2``; ``mass^2 / mass_sq`` is the effective number of
            positions behind a component (the unbiased variance needs it).
        entropy: () ``sum_i H(tau(x_i))`` in nats, summed over positions.
        positions: () the number of positions behind the statistics.

    Synchronised over processes, they are those of every process's positions, in float64,
    and the same on every process.
    """

    mean: Tensor
    var: Tensor
    mass: Tensor
    mass_sq: Tensor
    entropy: Tensor
    positions: Tensor


def positions_view(x3: Tensor) -> Tensor:
    """The positions view ``(B, C, L)`` of ``x3`` (N, C, L), without copying.

    ``(1, C, N * L)`` when all positions can be merged into one axis (dense inputs, whose
    ``L`` is 1, and channel-last layouts); otherwise ``x3`` itself.
    """
    n, c, length = x3.shape
    if length == 1:
        return x3.permute(2, 1, 0)
    if n == 1 or x3.stride(0) == length * x3.stride(2):
        return x3.transpose(1, 2).reshape(1, n * length, c).transpose(1, 2)
    return x3


def from_positions_view(view: Tensor, n: int, length: int) -> Tensor:
    """The (N, C, L) tensor whose :func:`positions_view` ``view`` is (inverse of that function)."""
    if length == 1:
        return view.permute(2, 1, 0)
    if view.shape[0] == n:
        return view
    return view.transpose(1, 2).reshape(n, length, view.shape[1]).transpose(1, 2)


def sample_positions(view: Tensor, count: int) -> Tensor:
    """At most ``count`` positions of ``view`` (B, C, L), drawn without replacement, as rows (P, C).

    Gathers the drawn positions only: no copy of the whole view.
    """
    batch, channels, length = view.shape
    total = batch * length
    if total <= count:
        return view.transpose(1, 2).reshape(total, channels)
    drawn = torch.randperm(total, device=view.device)[:count]
    return view[drawn // length, :, drawn % length]


def channels_inner(view: Tensor) -> bool:
    """Whether the channels of one position are adjacent in memory in ``view`` (B, C, L)."""
    return view.shape[2] > 1 and view.stride(1) == 1


def _dense(view: Tensor, inner: bool) -> Tensor:
    """``view`` laid out densely with channels innermost (``inner``) or positions innermost."""
    if inner:
        return view.transpose(1, 2).contiguous().transpose(1, 2)
    return view.contiguous()


def component_sums(weights: Tensor, values: Tensor) -> Tensor:
    """``sum_{b,l} weights[b, k, l] * values[b, c, l]`` (K, C): one batched matrix product.

    The operand order is the one the BLAS runs fastest for each layout (measured: with the
    positions innermost, ``values @ weights^T`` per sample is twice as fast as the converse;
    with the channels innermost, the converse is ten times faster).
    """
    if channels_inner(values):
        return torch.matmul(weights, values.transpose(1, 2)).sum(0)
    return torch.bmm(values, weights.transpose(1, 2)).sum(0).t()


def expand_components(
    coefficients: Tensor, weights: Tensor, inner: bool, out: Tensor | None = None
) -> Tensor:
    """``sum_k weights[b, k, l] * coefficients[k, c]`` (B, C, L), in the layout ``inner`` names.

    ``out``: a (B, C, L) tensor in that layout to write into instead of allocating one.
    """
    if inner:
        result = torch.matmul(
            weights.transpose(1, 2), coefficients, out=None if out is None else out.transpose(1, 2)
        )
        return result.transpose(1, 2)
    expanded = coefficients.t().expand(weights.shape[0], -1, -1).contiguous()
    return torch.bmm(expanded, weights, out=out)


def _expand_components_add_(
    target: Tensor, coefficients: Tensor, weights: Tensor, inner: bool
) -> Tensor:
    """``target += expand_components(coefficients, weights)`` in place, without a temporary."""
    if inner:
        target.transpose(1, 2).baddbmm_(
            weights.transpose(1, 2), coefficients.expand(weights.shape[0], -1, -1)
        )
    else:
        target.baddbmm_(coefficients.t().expand(weights.shape[0], -1, -1).contiguous(), weights)
    return target


def log_joint_coefficients(
    log_prior: Tensor, mean: Tensor, var: Tensor, reference: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha, beta, gamma)``: ``log lambda_k N(x | m_k, var_k) = alpha x'^2 + beta x' + gamma``.

    ``x' = x - reference`` per channel; ``alpha, beta`` (K, C) are summed over channels
    against ``x'^2`` and ``x'``, ``gamma`` (K,) is the constant. ``var`` must be positive
    (add ``eps`` first). Differentiable in every argument but ``reference``.
    """
    precision = var.reciprocal()
    centred = mean - reference
    beta = centred * precision
    gamma = log_prior - 0.5 * (
        (centred * beta).sum(1) + var.log().sum(1) + mean.shape[1] * _LOG_2PI
    )
    return -0.5 * precision, beta, gamma


def _project(coefficients: Tensor, values: Tensor) -> Tensor:
    """``sum_c coefficients[k, c] * values[b, c, l]`` (B, K, L), the product the BLAS runs fastest.

    An explicit batched product: ``matmul`` of a (K, C) matrix that requires grad with a
    (B, C, L) batch folds the batch into one matrix through a full copy of it.
    """
    if channels_inner(values):
        return torch.matmul(values.transpose(1, 2), coefficients.t()).transpose(1, 2)
    return torch.bmm(coefficients.expand(values.shape[0], -1, -1), values)


def log_joint(
    centred: Tensor, squares: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor
) -> Tensor:
    """``log lambda_k p(x | k)`` (B, K, L) from centred values and their squares (B, C, L)."""
    return _project(alpha, squares) + _project(beta, centred) + gamma.view(1, -1, 1)


def _moments(tau: Tensor, centred: Tensor, squares: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted mean (around the reference) and biased variance (K, C), and the mass (K,)."""
    return _weighted_moments(
        tau.sum((0, 2)), component_sums(tau, centred), component_sums(tau, squares)
    )


def _weighted_moments(mass: Tensor, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance (K, C) from the weighted sums of ``x``, ``x^2`` and 1; the mass."""
    safe = mass.clamp_min(torch.finfo(mass.dtype).tiny).unsqueeze(1)
    mean = first / safe
    var = (second / safe - mean * mean).clamp_min(0.0)
    return mean, var, mass


def _floor_variances(
    mean: Tensor, var: Tensor, mass: Tensor, ratio: float
) -> tuple[Tensor, Tensor | None]:
    """``var`` kept at or above ``ratio`` times the batch's variance per channel; which were raised.

    The batch's variance comes from the components' moments (no extra pass over the data).
    """
    if ratio <= 0:
        return var, None
    share = (mass / mass.sum()).unsqueeze(1)
    total_mean = (share * mean).sum(0)
    floor = ratio * ((share * (var + mean * mean)).sum(0) - total_mean * total_mean)
    floored = var < floor
    return torch.where(floored, floor, var), floored


def _all_processes_statistics(
    tau: Tensor,
    log_tau: Tensor,
    centred: Tensor,
    squares: Tensor,
    reference: Tensor,
    group: dist.ProcessGroup | None,
) -> MixtureStats:
    """The :class:`MixtureStats` (variances not floored) of every process's positions.

    Each process's weighted sums are moved from its own reference to zero in float64 (so that
    they add up, whatever the processes' references), then summed over ``group`` with the
    squared weights, the entropy and the number of positions: one all-reduce of
    ``K * (2C + 2) + 2`` values. The result is the same on every process, and so are the
    statistics computed from it, in float64.
    """
    wide = torch.float64
    mass = tau.sum((0, 2)).to(wide).unsqueeze(1)
    first = component_sums(tau, centred).to(wide)
    second = component_sums(tau, squares).to(wide)
    shift = reference.to(wide)
    # sum tau x = sum tau x' + M r and sum tau x^2 = sum tau x'^2 + (2 sum tau x' + M r) r.
    sums = torch.cat(
        (
            mass,
            first + mass * shift,
            second + (2.0 * first + mass * shift) * shift,
            (tau * tau).sum((0, 2)).to(wide).unsqueeze(1),
        ),
        dim=1,
    )
    positions = torch.full((), tau.shape[0] * tau.shape[2], dtype=wide, device=tau.device)
    extras = torch.stack((-(tau * log_tau).sum().to(wide), positions))
    total = all_reduce_sum(torch.cat((sums.flatten(), extras)), group)
    channels = centred.shape[1]
    sums, extras = total.split((sums.numel(), 2))
    mass, first, second, mass_sq = sums.view(-1, 2 * channels + 2).split(
        (1, channels, channels, 1), dim=1
    )
    mean, var, mass = _weighted_moments(mass.squeeze(1), first, second)
    return MixtureStats(mean, var, mass, mass_sq.squeeze(1), extras[0], extras[1])


def _coefficients(
    mean: Tensor, var: Tensor, eps: float, gain: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale, shift, rsqrt(var + eps))`` (K, C) of the affine map of each component.

    ``x' * scale + shift == weight * gain_k (x' - mean_k) / sqrt(var_k + eps) + bias``.
    """
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std * gain.unsqueeze(1)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift, inv_std


def _native_passes(x: Tensor, inner: bool, group: object, *tables: Tensor | None):
    """The native passes (:mod:`~contextnorm.functional.native`) when they apply: besides
    :func:`~contextnorm.functional.native.kernels_for`'s conditions, one process and a
    non-empty ``x`` with positions innermost. ``None`` otherwise: the batched matrix products
    run."""
    if inner or group is not None or x.numel() == 0:
        return None
    return native.kernels_for(x, *tables)


class _BatchMixtureNorm(torch.autograd.Function):
    """[CBN] Eq. 5-9 on a positions view, with a hand-fused backward.

    Forward: ``tau = softmax_k(alpha x'^2 + beta x' + gamma)``; posterior-weighted batch
    mean ``mu_k`` and biased variance ``v_k``; ``y = sum_k tau_k (a_k x' + b_k)`` with
    ``a_k = weight gain_k / sqrt(v_k + eps)`` and ``b_k = bias - a_k mu_k`` (the bias folds in
    because the posterior sums to 1).

    Backward, with ``G`` the output gradient: the output path gives
    ``da_k = sum tau_k G x'``, ``db_k = sum tau_k G`` and ``dtau_k = G . (a_k x' + b_k)``;
    the small chain ``(a, b) -> (mu, v) -> (E1, E2, M)`` (the weighted sums of ``x'``, ``x'^2``
    and 1) is a few (K, C) operations; the sums give ``dtau_k += dE1_k x' + dE2_k x'^2 + dM_k``
    and ``dx += tau_k (dE1_k + 2 dE2_k x')``; the softmax gives ``dl = tau (dtau - sum tau dtau)``
    and ``dx += dl_k (2 alpha_k x' + beta_k)``. So
    ``dx = G A + x' S + O`` with ``A, S, O`` three mixtures of (K, C) coefficients by
    ``tau`` and ``dl``: two passes over the input beyond the reductions.

    ``posterior_grad=False`` treats the posterior as a constant (MixNorm's EM posterior).
    ``gain=None`` uses the batch's own mixture weights ``M_k / sum M`` (differentiated with
    the posterior).

    With a process ``group``, ``(E1, E2, M)`` are sums over every process's positions: the
    forward all-reduces them (moved to a common origin) before ``(mu, v)``; in the backward,
    ``d(mu, v)`` (and the batch gain's ``d gain``) from each process's output are summed over
    the processes before the chain to ``(E1, E2, M)``, which every process then applies to
    its own positions. The gradients of ``alpha, beta, gamma, gain, weight, bias`` stay this
    process's share, as for any parameter under data parallelism.

    On the CPU (one process, positions innermost) the passes over the activations run as native
    kernels that compute ``x'`` on the fly: nothing activation-sized is allocated but the output
    and the input gradient, and ``x`` is saved instead of ``x'``. Elsewhere they are batched
    matrix products over the materialised ``x'`` and ``x'^2``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        reference: Tensor,
        alpha: Tensor,
        beta: Tensor,
        gamma: Tensor,
        gain: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        posterior_grad: bool,
        floor_ratio: float,
        group: dist.ProcessGroup | None,
    ) -> tuple[Tensor, ...]:
        inner = channels_inner(x)
        kernels = _native_passes(x, inner, group, reference, alpha, beta, gamma, gain, weight, bias)
        if kernels is None:
            centred = _dense(x - reference.view(1, -1, 1), inner)
            squares = centred * centred
            logits = log_joint(centred, squares, alpha, beta, gamma)
        else:
            logits = kernels.mixture_logits(x, reference, alpha, beta, gamma)
        log_tau = torch.log_softmax(logits, dim=1)
        tau = log_tau.exp()
        if group is None:
            if kernels is None:
                mean, var, mass = _moments(tau, centred, squares)
            else:
                first, second = kernels.mixture_sums(x, reference, tau)
                mean, var, mass = _weighted_moments(tau.sum((0, 2)), first, second)
            var, floored = _floor_variances(mean, var, mass, floor_ratio)
            stats = None
        else:
            # Every process's statistics, in float64 and around zero; this process normalises
            # its own positions around its own reference, in their dtype.
            stats = _all_processes_statistics(tau, log_tau, centred, squares, reference, group)
            wide_var, floored = _floor_variances(stats.mean, stats.var, stats.mass, floor_ratio)
            stats = stats._replace(var=wide_var)
            mean = (stats.mean - reference.to(stats.mean.dtype)).to(centred.dtype)
            var, mass = wide_var.to(centred.dtype), stats.mass.to(centred.dtype)
        batch_gain = gain is None
        if batch_gain:
            gain = (mass / mass.sum()).clamp_min(torch.finfo(mass.dtype).tiny).rsqrt()
        scale, shift, _ = _coefficients(mean, var, eps, gain, weight, bias)
        if kernels is None:
            # The squares are no longer needed: their memory takes the output.
            out = expand_components(scale, tau, inner, out=squares)
            out.mul_(centred)
            _expand_components_add_(out, shift, tau, inner)
        else:
            out = kernels.mixture_output(x, reference, tau, scale, shift)
        if stats is None:
            positions = torch.full((), x.shape[0] * x.shape[2], dtype=mass.dtype, device=x.device)
            stats = MixtureStats(
                mean + reference,
                var,
                mass,
                (tau * tau).sum((0, 2)),
                -(tau * log_tau).sum(),
                positions,
            )
        # The native passes recompute x' from x and the reference.
        values = centred if kernels is None else x
        saved = (values, reference, tau, alpha, beta, gain, weight, bias, mean, var, mass, floored)
        ctx.save_for_backward(*saved)
        ctx.flags = (inner, batch_gain, posterior_grad, floor_ratio, eps, group, kernels)
        ctx.mark_non_differentiable(*stats)
        return (out, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, ...]:
        values, reference, tau, alpha, beta, gain, weight, bias = ctx.saved_tensors[:8]
        mean, var, mass, floored = ctx.saved_tensors[8:]
        inner, batch_gain, posterior_grad, floor_ratio, eps, group, kernels = ctx.flags
        needs = ctx.needs_input_grad
        scale, shift, inv_std = _coefficients(mean, var, eps, gain, weight, bias)
        grad = _dense(grad, inner)
        if kernels is None:
            centred = values
            work = grad * centred
            grad_scale = component_sums(tau, work)
            grad_shift = component_sums(tau, grad)
            grad_tau = _project(scale, work) + _project(shift, grad) if posterior_grad else None
        else:
            sums, grad_tau = kernels.mixture_output_backward(
                grad, values, reference, tau, scale, shift, posterior_grad
            )
            grad_scale, grad_shift = sums

        # (scale, shift) -> (mean, var, gain, weight, bias); shift = bias - mean * scale.
        grad_bias = grad_shift.sum(0) if needs[7] else None
        grad_scale = grad_scale - mean * grad_shift
        grad_mean = -scale * grad_shift
        grad_var = -0.5 * grad_scale * scale * inv_std * inv_std
        per_gain = (grad_scale * inv_std if weight is None else grad_scale * inv_std * weight).sum(
            1
        )
        grad_gain = per_gain if needs[5] and not batch_gain else None
        grad_weight = (grad_scale * inv_std * gain.unsqueeze(1)).sum(0) if needs[6] else None
        if group is not None:
            # The parameters' gradients above are this process's share (DDP sums them); the
            # statistics are every process's, so their gradient is the sum over processes.
            grad_mean, grad_var, per_gain = _sum_over_processes(
                (grad_mean, grad_var, per_gain if batch_gain else None), group
            )
        grad_floor = None
        if floored is not None:
            grad_floor = floor_ratio * (grad_var * floored).sum(0)
            grad_var = grad_var.masked_fill(floored, 0.0)

        # (mean, var) -> the weighted sums E1 = sum tau x', E2 = sum tau x'^2 and M = sum tau.
        safe = mass.clamp_min(torch.finfo(mass.dtype).tiny).unsqueeze(1)
        grad_first = (grad_mean - 2.0 * mean * grad_var) / safe
        grad_second = grad_var / safe
        if grad_floor is not None:
            # floor = ratio * (sum_k E2_k / P - (sum_k E1_k / P)^2), P = sum_k M_k.
            positions = mass.sum()
            total_mean = (mass.unsqueeze(1) * mean).sum(0) / positions
            grad_first = grad_first - 2.0 * total_mean * grad_floor / positions
            grad_second = grad_second + grad_floor / positions
        slope, offset, weights = 2.0 * grad_second, grad_first, tau
        grad_alpha = grad_beta = grad_gamma = None
        if posterior_grad:
            grad_mass = -(grad_mean * mean + grad_var * (var - mean * mean)).sum(1) / safe.squeeze(
                1
            )
            if batch_gain:
                # gain_k = (M_k / sum M)^(-1/2):
                # d gain_k / d M_j = -gain_k (delta_kj / M_k - 1 / sum M) / 2.
                pulled = per_gain * gain
                grad_mass = grad_mass - 0.5 * (pulled / safe.squeeze(1) - pulled.sum() / mass.sum())
            if kernels is None:
                squares = torch.mul(centred, centred, out=work)
                grad_tau += _project(grad_first, centred) + _project(grad_second, squares)
                grad_tau += grad_mass.view(1, -1, 1)
            else:
                # The log-joint's pass computes sum_c (a x'^2 + b x') + g for any a, b, g.
                grad_tau += kernels.mixture_logits(
                    values, reference, grad_second, grad_first, grad_mass
                )
            grad_logit = tau * (grad_tau - (tau * grad_tau).sum(1, keepdim=True))
            if kernels is None:
                grad_alpha = component_sums(grad_logit, squares) if needs[2] else None
                grad_beta = component_sums(grad_logit, centred) if needs[3] else None
            elif needs[2] or needs[3]:
                grad_beta, grad_alpha = kernels.mixture_sums(values, reference, grad_logit)
                grad_alpha, grad_beta = (
                    (grad_alpha if needs[2] else None),
                    (grad_beta if needs[3] else None),
                )
            if needs[4]:
                grad_gamma = grad_logit.sum((0, 2))

        grad_x = None
        if needs[0] and kernels is not None:
            grad_x = kernels.mixture_input_grad(
                grad,
                values,
                reference,
                tau,
                scale,
                slope,
                offset,
                grad_logit if posterior_grad else None,
                2.0 * alpha if posterior_grad else None,
                beta if posterior_grad else None,
            )
        elif needs[0]:
            if posterior_grad:
                slope = torch.cat([slope, 2.0 * alpha])
                offset = torch.cat([offset, beta])
                weights = torch.cat([tau, grad_logit], 1)
            grad_x = expand_components(slope, weights, inner)
            grad_x.mul_(centred)
            _expand_components_add_(grad_x, offset, weights, inner)
            grad_x.addcmul_(grad, expand_components(scale, tau, inner, out=work))
        return (
            grad_x,
            None,
            grad_alpha,
            grad_beta,
            grad_gamma,
            grad_gain,
            grad_weight,
            grad_bias,
            None,
            None,
            None,
            None,
        )


def _sum_over_processes(
    tensors: tuple[Tensor | None, ...], group: dist.ProcessGroup | None
) -> list[Tensor | None]:
    """Each tensor summed over the processes of ``group`` (``None`` stays): one all-reduce."""
    present = [tensor for tensor in tensors if tensor is not None]
    total = all_reduce_sum(torch.cat([tensor.flatten() for tensor in present]), group)
    parts = iter(total.split([tensor.numel() for tensor in present]))
    return [None if tensor is None else next(parts).view_as(tensor) for tensor in tensors]


def batch_mixture_norm(
    x: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    eps: float,
    gain: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    posterior_grad: bool = True,
    reference: Tensor | None = None,
    variance_floor: float = 0.0,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, MixtureStats]:
    """The training transform of ACN and MixNorm ([CBN] Eq. 5-9, [PKN] Eq. 19-21).

    ``tau_k(x_i) = softmax_k(alpha_k x'^2 + beta_k x' + gamma_k)`` (the posterior under the
    mixture whose :func:`log_joint_coefficients` these are, with ``x' = x - reference``);
    ``mu_k, v_k``: the posterior-weighted batch mean and biased variance;
    ``y_i = weight * sum_k tau_k(x_i) gain_k (x_i - mu_k) / sqrt(v_k + eps) + bias``.

    Args:
        x: positions view (B, C, L) (:func:`positions_view`), float32 or float64.
        alpha, beta, gamma: the mixture's log-joint coefficients around ``reference``.
        gain: (K,) ``1/sqrt(lambda_k)``; ``None`` for ``1/sqrt`` of the batch's own mixture
            weights ``sum_i tau_k(x_i) / P``.
        posterior_grad: differentiate through the posterior (ACN) or treat it as a constant
            (MixNorm, whose posterior comes from EM).
        reference: (C,) the centre of ``x'``; the detached batch mean when omitted.
        variance_floor: ``v_k`` is kept at or above this fraction of the batch's variance in
            its channel (0: no floor); the floor is differentiated as a function of the batch.
        group: a process group whose processes' positions share the statistics (``None``:
            this batch alone). Each process passes its own positions (none at all included)
            and gets the statistics of all of them, as one process would on the concatenated
            batch: one all-reduce of ``K * (2C + 2) + 2`` values in the forward, one of the
            statistics' ``2 K C`` gradients in the backward (``K`` more with ``gain=None``).
            Every process of the group must make the same calls in the same order.

    Returns ``y`` (B, C, L) and the :class:`MixtureStats` of the batch (of every process's
    batch with ``group``).
    """
    if reference is None:
        reference = x.detach().mean((0, 2))
    out, *stats = _BatchMixtureNorm.apply(
        x,
        reference,
        alpha,
        beta,
        gamma,
        gain,
        weight,
        bias,
        eps,
        posterior_grad,
        float(variance_floor),
        group,
    )
    return out, MixtureStats(*stats)


def mixture_transform(
    x: Tensor,
    reference: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gain: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """The inference transform ([CBN] Eq. 15 form) with given statistics ``mean, var`` (K, C).

    ``y_i = weight * sum_k tau_k(x_i) gain_k (x_i - mean_k) / sqrt(var_k + eps) + bias`` with
    the posterior from ``alpha, beta, gamma`` (around ``reference``, (C,)). Plain autograd.
    """
    inner = channels_inner(x)
    centred = x - reference.view(1, -1, 1)
    tau = torch.softmax(log_joint(centred, centred * centred, alpha, beta, gamma), dim=1)
    scale, shift, _ = _coefficients(mean - reference, var, eps, gain, weight, bias)
    return torch.addcmul(
        expand_components(shift, tau, inner), centred, expand_components(scale, tau, inner)
    )


def diag_gaussian_log_density(points: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Log-density (P, K) of points (P, C) under each diagonal Gaussian (K, C)."""
    reference = points.detach().mean(0)
    centred = points.t().unsqueeze(0) - reference.view(1, -1, 1)
    no_prior = torch.zeros(mean.shape[0], dtype=mean.dtype, device=mean.device)
    coefficients = log_joint_coefficients(no_prior, mean, var, reference)
    return log_joint(centred, centred * centred, *coefficients)[0].t()


def kmeans_plus_plus(
    points: Tensor, num_components: int, generator: torch.Generator | None = None
) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii): ``num_components`` rows of ``points`` (P, C).

    The seeding is sequential by definition; each step costs one (P, C) distance update.
    Distances are summed in float64: squared distances of large activations overflow float32
    and would turn the sampling probabilities into NaN. No host synchronisation.
    """
    wide = points.double()
    first = torch.randint(points.shape[0], (1,), device=points.device, generator=generator)
    chosen = [first]
    closest = ((wide - wide[first]) ** 2).sum(1)
    for _ in range(1, num_components):
        total = closest.sum()
        # All points on the chosen centres: any point will do.
        probabilities = torch.where(total > 0, closest / total.clamp_min(1e-300), 1.0)
        index = torch.multinomial(probabilities, 1, generator=generator)
        chosen.append(index)
        closest = torch.minimum(closest, ((wide - wide[index]) ** 2).sum(1))
    return points[torch.cat(chosen)]


def fit_diag_gmm(
    points: Tensor,
    log_prior: Tensor,
    mean: Tensor,
    var: Tensor,
    steps: int,
    variance_floor: Tensor | float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` EM iterations of a diagonal Gaussian mixture on points (P, C) from a start.

    Returns ``(log_prior (K,), mean (K, C), var (K, C))``. The E-step is a log-space softmax,
    so far-away points never make every density underflow to zero; variances are kept at or
    above ``variance_floor`` (a number or (C,) / (K, C) tensor); a component that loses all its
    points keeps its previous parameters instead of becoming NaN. No host synchronisation.
    """
    view = points.t().unsqueeze(0)
    reference = points.mean(0)
    centred = view - reference.view(1, -1, 1)
    squares = centred * centred
    tiny = torch.finfo(points.dtype).tiny
    for _ in range(steps):
        tau = torch.softmax(
            log_joint(centred, squares, *log_joint_coefficients(log_prior, mean, var, reference)), 1
        )
        new_mean, new_var, mass = _moments(tau, centred, squares)
        alive = (mass > 1e-6 * points.shape[0]).unsqueeze(1)
        mean = torch.where(alive, new_mean + reference, mean)
        var = torch.where(
            alive, torch.maximum(new_var, torch.as_tensor(variance_floor, dtype=var.dtype)), var
        )
        log_prior = torch.log((mass / mass.sum()).clamp_min(tiny))
    return log_prior, mean, var


def match_components(mean: Tensor, reference_mean: Tensor, reference_var: Tensor) -> Tensor:
    """Order (K,) that pairs freshly fitted components with reference ones, greedily.

    EM labels components arbitrarily on each batch; running estimates need the same label
    to mean the same component. Pairs are taken closest first, by the squared distance
    between means scaled by the reference variances: ``mean[order]`` lines up with
    ``reference_mean``. Tensor operations only (no host synchronisation).
    """
    cost = (
        ((mean.unsqueeze(0) - reference_mean.unsqueeze(1)) ** 2) / reference_var.unsqueeze(1)
    ).sum(2)
    count = cost.shape[0]
    # Overflowed costs stay below the infinity that marks pairs already taken.
    wide = torch.finfo(torch.float64).max
    cost = torch.nan_to_num(cost.double(), nan=wide, posinf=wide)
    order = torch.zeros(count, dtype=torch.long, device=mean.device)
    for _ in range(count):
        flat = torch.argmin(cost)
        slot, fitted = flat // count, flat % count
        order = order.index_put((slot.view(1),), fitted.view(1))
        cost = cost.index_fill(0, slot.view(1), math.inf).index_fill(1, fitted.view(1), math.inf)
    return order
