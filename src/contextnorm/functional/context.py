"""The supervised context layers' own steps: the per-sample context posterior (000 Eq. 6,
004 Eq. 12-13) and the per-context normalising affine map."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_log_posterior(
    mean: Tensor,
    var: Tensor,
    positions: int,
    context_mean: Tensor,
    context_var: Tensor,
    log_prior: Tensor,
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


def context_affine(
    x: Tensor,
    ids: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    gain: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``y[n] = weight[k] * gain[k] * (x[n] - mean[k]) / sqrt(var[k] + eps) + bias[k]`` with ``k =
    ids[n]``.

    The normalising step of CN, CN-X and CN-E for known context ids: ``x`` (N, C, L),
    ``ids`` (N,), per-context ``mean``, ``var`` (K, C), ``gain`` (K, 1) (the
    ``1/sqrt(lambda_k)`` factor) and ``weight``, ``bias`` (K, C) or shared (C,). One autograd
    node with a hand-written backward: per-sample reductions scattered into the K contexts, so
    the cost does not grow with K and small inputs are not dominated by bookkeeping. Computed
    in the statistics' precision, the output in ``x``'s dtype. Pass
    :attr:`~contextnorm.functional.Moments.values` as ``x`` when ``mean``, ``var`` come from
    the batch's moments.
    """
    return _ContextAffine.apply(x, ids, mean, var, eps, gain, weight, bias)


class _ContextAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, mean, var, eps, gain, weight, bias):  # type: ignore[override]
        root = torch.rsqrt(var + eps)
        scale = root if gain is None else root * gain
        full_scale = scale if weight is None else scale * weight
        shift = (
            -mean * full_scale
            if bias is None
            else torch.addcmul(bias, mean, full_scale, value=-1.0)
        )
        sample_scale = full_scale.index_select(0, ids)
        ctx.save_for_backward(x, ids, mean, root, scale, full_scale, sample_scale, weight)
        ctx.shapes = (
            None if weight is None else weight.dim(),
            None if bias is None else bias.dim(),
        )
        return torch.addcmul(
            shift.index_select(0, ids).unsqueeze(-1), x, sample_scale.unsqueeze(-1)
        ).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, ids, mean, root, scale, full_scale, sample_scale, weight = ctx.saved_tensors
        weight_dim, bias_dim = ctx.shapes
        with torch.autocast(x.device.type, enabled=False):
            wide = grad.to(sample_scale.dtype)
            grad_x = (
                (wide * sample_scale.unsqueeze(-1)).to(x.dtype) if ctx.needs_input_grad[0] else None
            )
            per_sample = torch.stack(
                (torch.einsum("ncl,ncl->nc", wide, x.to(wide.dtype)), wide.sum(2))
            )
            per_context = per_sample.new_zeros(2, *mean.shape).index_add_(1, ids, per_sample)
            grad_full_scale = torch.addcmul(per_context[0], per_context[1], mean, value=-1.0)
            grad_mean = -per_context[1] * full_scale
            grad_weight = grad_bias = None
            if weight_dim is not None:
                grad_weight = grad_full_scale * scale
                grad_weight = grad_weight.sum(0) if weight_dim == 1 else grad_weight
                grad_scale = grad_full_scale * weight
            else:
                grad_scale = grad_full_scale
            if bias_dim is not None:
                grad_bias = per_context[1].sum(0) if bias_dim == 1 else per_context[1]
            grad_var = (-0.5) * grad_scale * scale * root * root
        return grad_x, None, grad_mean, grad_var, None, None, grad_weight, grad_bias
