"""The supervised context layers' own steps: the per-sample context posterior (000 Eq. 6,
004 Eq. 12-13) and the per-context normalising affine map."""

from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .moments import cast, running_rate, statistics_dtype, update_running_moments


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

    Eager calls on the CPU in float32 or float64 run the native kernel
    (:mod:`~contextnorm.functional.native`); everything else this PyTorch implementation.
    """
    kernels = native.kernels_for(x, mean, var, gain, weight, bias)
    if kernels is not None:
        return kernels.context_affine(x, ids, mean, var, eps, gain, weight, bias)
    return _ContextAffine.apply(x, ids, mean, var, eps, gain, weight, bias)


def learned_context_affine(
    x: Tensor,
    ids: Tensor,
    mean: Tensor,
    raw_std: Tensor,
    eps: float,
    gain: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    mean_offset: Tensor | None = None,
    raw_std_offset: Tensor | None = None,
) -> Tensor:
    """:func:`context_affine` with learned statistics, as CN-X and CN-E parametrise them.

    Context ``k`` has mean ``mean[k] + mean_offset`` and standard deviation
    ``softplus(raw_std[k] + raw_std_offset)``: ``mean``, ``raw_std`` (K, C), the offsets (C,)
    shared by the contexts and optional (CN-E's linear encoders: the weight's transpose and
    the bias). Eager calls on the CPU in float32 or float64 compute the statistics inside the
    native kernel's autograd node (:mod:`~contextnorm.functional.native`); elsewhere this is the
    composition of the statistics and :func:`context_affine`.
    """
    kernels = native.kernels_for(x, mean, raw_std, gain, weight, bias, mean_offset, raw_std_offset)
    if kernels is not None:
        return kernels.learned_context_affine(
            x, ids, mean, raw_std, eps, gain, weight, bias, mean_offset, raw_std_offset
        )
    mean, var = learned_statistics(mean, raw_std, mean_offset, raw_std_offset)
    return context_affine(x, ids, mean, var, eps, gain, weight, bias)


def learned_statistics(
    mean: Tensor,
    raw_std: Tensor,
    mean_offset: Tensor | None = None,
    raw_std_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and variance (K, C) of the learned statistics of :func:`learned_context_affine`."""
    if mean_offset is not None:
        mean = mean + mean_offset
    if raw_std_offset is not None:
        raw_std = raw_std + raw_std_offset
    std = torch.nn.functional.softplus(raw_std)
    return mean, std * std


class _ContextAffine(torch.autograd.Function):
    # On small inputs every tensor operation costs microseconds of dispatch, more than its
    # arithmetic: forward and backward use as few operations as the math allows.
    @staticmethod
    def forward(ctx, x, ids, mean, var, eps, gain, weight, bias):  # type: ignore[override]
        root = (var + eps).rsqrt_()
        scale = root if gain is None else root * gain
        full_scale = scale if weight is None else scale * weight
        shift = (
            -mean * full_scale
            if bias is None
            else torch.addcmul(bias, mean, full_scale, value=-1.0)
        )
        sample_scale = full_scale.index_select(0, ids).unsqueeze(2)
        ctx.save_for_backward(x, ids, mean, root, scale, full_scale, sample_scale, weight)
        ctx.shapes = (
            None if weight is None else weight.dim(),
            None if bias is None else bias.dim(),
        )
        # A product and an in-place sum: a broadcasting addcmul is several times slower on CPU.
        y = torch.mul(x, sample_scale)
        return cast(y.add_(shift.index_select(0, ids).unsqueeze(2)), x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, ids, mean, root, scale, full_scale, sample_scale, weight = ctx.saved_tensors
        weight_dim, bias_dim = ctx.shapes
        wide = cast(grad, sample_scale.dtype)
        # One activation-sized buffer holds grad * x, then the input gradient: on large inputs a
        # fresh allocation costs more than the arithmetic.
        buffer = wide * x
        per_sample = torch.stack((buffer.sum(2), wide.sum(2)))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = cast(torch.mul(wide, sample_scale, out=buffer), x.dtype)
        grad_full_scale, grad_shift = per_sample.new_zeros(2, *mean.shape).index_add_(
            1, ids, per_sample
        )
        grad_full_scale.addcmul_(grad_shift, mean, value=-1.0)
        grad_mean = grad_shift * full_scale
        grad_mean.neg_()
        grad_weight = grad_bias = None
        if weight_dim is not None:
            grad_weight = grad_full_scale * scale
            grad_weight = grad_weight.sum(0) if weight_dim == 1 else grad_weight
            grad_scale = grad_full_scale * weight
        else:
            grad_scale = grad_full_scale
        if bias_dim is not None:
            grad_bias = grad_shift.sum(0) if bias_dim == 1 else grad_shift
        # d full_scale / d var = -full_scale * root^2 / 2
        grad_var = grad_scale.mul_(scale).mul_(root * root).mul_(-0.5)
        return grad_x, None, grad_mean, grad_var, None, None, grad_weight, grad_bias


def context_batch_norm(
    x: Tensor,
    ids: Tensor,
    num_contexts: int,
    eps: float,
    gain: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    momentum: float | None = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CN in training: each sample normalised with the batch statistics of its context.

    ``y[n] = weight[k] * gain[k] * (x[n] - mean[k]) / sqrt(var[k] + eps) + bias[k]`` with
    ``k = ids[n]`` and ``mean``, ``var`` the mean and biased variance (K, C) of the
    activations of context ``k`` in ``x`` (N, C, L). Returns ``(y, mean, var, count)``:
    ``y`` in ``x``'s dtype, the statistics (without gradient) and the values per channel
    behind them, ``count`` (K,). ``gain`` (K, 1), ``weight`` and ``bias`` (K, C) as in
    :func:`context_affine`.

    With ``running_mean`` and ``running_var`` (K, C), BatchNorm's running update is applied in
    place to the contexts present in the batch (:func:`update_running_moments`), counting the
    batch in ``num_batches_tracked`` (K,) when given; ``momentum=None`` (the cumulative
    average) needs it.

    The variance is a two-pass sum of squared deviations from the context's mean (as
    BatchNorm's kernel computes it), in float32 for half-precision input. One autograd node
    whose backward is BatchNorm's, per context: a small input is not dominated by the
    bookkeeping of the dozens of autograd nodes the composition of :func:`sample_moments`,
    :func:`pooled_moments` and :func:`context_affine` costs. Use those where the statistics
    are shared across processes. Eager calls on the CPU in float32 or float64 run the native
    kernel (:mod:`~contextnorm.functional.native`), everything else this PyTorch
    implementation.
    """
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            "momentum=None (the cumulative average) counts batches in num_batches_tracked; "
            "pass it, or a float momentum"
        )
    kernels = native.kernels_for(x, gain, weight, bias, running_mean, running_var)
    # The running statistics are updated in place.
    running = (running_mean, running_var, num_batches_tracked)
    if kernels is not None and all(t is None or t.is_contiguous() for t in running):
        y, mean, var, count = kernels.context_batch_norm(
            x,
            ids,
            num_contexts,
            eps,
            gain,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            -1.0 if momentum is None else momentum,
        )
        return y, mean, var, count
    y, mean, var, count = _ContextBatchNorm.apply(x, ids, num_contexts, eps, gain, weight, bias)
    if running_mean is not None and running_var is not None:
        rate = (
            momentum
            if num_batches_tracked is None
            else running_rate(num_batches_tracked, count > 0, momentum, running_mean.dtype)
        )
        update_running_moments(running_mean, running_var, mean, var, count, rate)
    return y, mean, var, count


class _ContextBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, num_contexts, eps, gain, weight, bias):  # type: ignore[override]
        wide = cast(x, statistics_dtype(x.dtype))
        positions = x.shape[2]
        samples = wide.new_zeros(num_contexts).index_add_(0, ids, wide.new_ones(ids.shape))
        count = samples * positions
        # Empty contexts divide 0 by 1: mean 0 and variance 0, which the running update skips.
        denominator = count.clamp_min(1.0).unsqueeze(1)
        zeros = wide.new_zeros(num_contexts, x.shape[1])
        mean = zeros.index_add(0, ids, wide.sum(2)).div_(denominator)
        centred = wide - mean.index_select(0, ids).unsqueeze(2)
        # A norm reduces without writing the squares: no activation-sized temporary.
        squares = torch.linalg.vector_norm(centred, dim=2).square_()
        var = zeros.index_add_(0, ids, squares).div_(denominator)
        root = (var + eps).rsqrt_()
        scale = root if gain is None else root * gain
        full_scale = scale if weight is None else scale * weight
        # The output reuses the centred values' memory; the backward recomputes them from x.
        y = centred.mul_(full_scale.index_select(0, ids).unsqueeze(2))
        if bias is not None:
            y.add_(bias.index_select(0, ids).unsqueeze(2))
        ctx.save_for_backward(x, ids, mean, root, scale, full_scale, weight, denominator)
        ctx.mark_non_differentiable(mean, var, count)
        return cast(y, x.dtype), mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _mean, _var, _count):  # type: ignore[override]
        x, ids, mean, root, scale, full_scale, weight, denominator = ctx.saved_tensors
        wide_grad = cast(grad, mean.dtype)
        wide = cast(x, mean.dtype)
        sample_mean = mean.index_select(0, ids).unsqueeze(2)
        # One activation-sized buffer holds grad * (x - mean), then (x - mean) again, then the
        # input gradient: on large inputs a fresh allocation costs more than the arithmetic.
        buffer = torch.sub(wide, sample_mean).mul_(wide_grad)
        per_sample = torch.stack((wide_grad.sum(2), buffer.sum(2)))
        # Per context: the sums of the gradient and of the gradient times (x - mean).
        grad_shift, grad_centred = per_sample.new_zeros(2, *mean.shape).index_add_(
            1, ids, per_sample
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            # BatchNorm's backward: full_scale * (dy - E[dy] - x_hat * E[dy * x_hat]), per
            # context, as per-sample coefficients of dy, (x - mean) and 1.
            slope = full_scale * root * root * grad_centred / denominator
            offset = full_scale * grad_shift / denominator
            coefficients = torch.stack((full_scale, slope.neg_(), offset.neg_()))
            sample = coefficients.index_select(1, ids).unsqueeze(3)
            centred = torch.sub(wide, sample_mean, out=buffer)
            grad_x = centred.mul_(sample[1]).addcmul_(wide_grad, sample[0]).add_(sample[2])
            grad_x = cast(grad_x, x.dtype)
        grad_weight = grad_centred * scale if ctx.needs_input_grad[5] else None
        grad_bias = grad_shift if ctx.needs_input_grad[6] else None
        return grad_x, None, None, None, None, grad_weight, grad_bias
