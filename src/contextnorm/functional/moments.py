"""Per-sample moments, their pooling into group statistics, and the per-sample affine map.

The context layers, ModeNorm and SwitchNorm share one computational pattern: one pass over
the activations gives per-sample, per-channel moments (N, C); every statistic a layer needs
is a small weighted combination of those moments; one more pass applies a per-sample affine
map ``y = x * scale[n, c] + shift[n, c]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

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
