"""Per-sample moments, their pooling into group statistics, and the per-sample affine map.

The context layers, ModeNorm and SwitchNorm share one computational pattern:

1. :func:`sample_moments`: one pass over the activations gives each sample's mean and
   biased variance per channel (N, C);
2. :func:`group_sums` -> :func:`group_moments`: the statistics of every group (context,
   mode, the whole batch) are small weighted combinations of those moments, written as
   sufficient statistics (count, shifted sum, shifted sum of squares) around a shift;
3. :func:`affine_coefficients` and :func:`apply_sample_affine`: one more pass applies a
   per-sample affine map ``y = x * scale[n, c] + shift[n, c]``.

Precision. Statistics are computed in float32 (float64 for float64 input) whatever the input
dtype, with autocast disabled by the callers: ``einsum`` and ``@`` are autocast ops and would
lower widened tensors again. Per-sample moments use BatchNorm's own two-pass kernel, so they
stay accurate far from zero; group variances are sums of squared deviations from a shift
close to the group's mean, never ``E[x^2] - E[x]^2`` of raw values.

Several processes. The group statistics of a batch split over processes are the sums of
each process's :func:`group_sums`, provided every process uses the same shift (one all-reduce
of ``K * (2C + 1)`` values); the shift only has to be near the data for accuracy (running
means, or a shift exchanged first). Every function here is differentiable by autograd, so the
backward of that all-reduce is the all-reduce of the gradients of the same sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


def as_ncl(
    x: Tensor, num_features: int, channel_last: bool = False
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``x`` as (N, C, L) and return the view with a function mapping (N, C, L) back.

    Raises a ``ValueError`` naming the expected layout when the channel count is wrong. An
    empty batch (N = 0) is accepted, as BatchNorm accepts it.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    channel_dim = -1 if channel_last and x.dim() > 2 else 1
    if x.shape[channel_dim] != num_features:
        layout = "(N, *, C) with channel_last=True" if channel_last else "(N, C, *spatial)"
        hint = "" if channel_last else "; for token tensors (N, L, C) pass channel_last=True"
        raise ValueError(
            f"expected {num_features} channels at dim {channel_dim} of an input laid out as "
            f"{layout}, "
            f"got shape {tuple(x.shape)}{hint}"
        )
    shape = x.shape
    n = shape[0]
    positions = 1
    for size in shape[2:] if channel_dim == 1 else shape[1:-1]:
        positions *= size
    if channel_dim == 1:
        return x.reshape(n, num_features, positions), lambda y: y.reshape(shape)
    return (
        x.reshape(n, positions, num_features).transpose(1, 2),
        lambda y: y.transpose(1, 2).reshape(shape),
    )


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics of ``dtype`` activations are computed in: float32, or float64 for
    float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, skipped when ``x`` has that dtype: on small tensors even a no-op
    conversion costs microseconds of dispatch, and the layers convert on every call."""
    return x if x.dtype == dtype else x.to(dtype)


def without_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """A block in which autocast does not lower operations on ``x``'s device (``@``, ``einsum``).

    The layers compute their statistics inside it; outside autocast it is a no-op.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class Moments(NamedTuple):
    """Per-sample, per-channel mean and biased variance over positions, each (N, C), and the values.

    ``values`` is the (N, C, L) input in the statistics' dtype (the input itself, or its
    float32 copy for half-precision input), routed through the moments' backward: pass it
    (not the raw input) to :func:`apply_sample_affine` so that the gradient of everything
    computed from ``mean`` and ``var`` reaches the input in one fused pass, summed in float32
    and rounded once, as BatchNorm's backward does.
    """

    mean: Tensor
    var: Tensor
    values: Tensor


def sample_moments(x: Tensor) -> Moments:
    """Mean and biased variance of each (sample, channel) of ``x`` (N, C, L) over positions.

    Computed by BatchNorm's statistics kernel on the (1, N*C, L) view of ``x`` (a two-pass
    reduction, accurate far from zero, and as fast as two plain sums), in float32 for
    half-precision input. Channel-last input is copied once to make that view.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        mean, var, values = _SampleMoments.apply(x)
        return Moments(mean, var, values)
    return Moments(*_moments(x))


def _moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and the values in the statistics dtype (``x`` itself when it has that
    dtype)."""
    n, c, length = x.shape
    wide = cast(x, statistics_dtype(x.dtype))
    if wide.numel() == 0:
        empty = wide.new_zeros(n, c)
        return empty, empty.clone(), wide
    if length == 1:
        flat = wide.reshape(n, c)
        return flat.clone(), torch.zeros_like(flat), wide
    if _traced():
        # Compiled and exported graphs (ONNX among them) have no BatchNorm-statistics
        # operator: the same accurate moments, as a reduction they lower (a fused Welford
        # reduction in compiled code).
        var, mean = torch.var_mean(wide, dim=2, correction=0)
        return mean, var, wide
    mean, var = torch.batch_norm_update_stats(wide.reshape(1, n * c, length), None, None, 0.0)
    return mean.view(n, c), var.view(n, c), wide


def _traced() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class _SampleMoments(torch.autograd.Function):
    """``(mean, var, x)`` of ``x``, whose backward adds the moments' gradient to the values' in one
    pass.

    With ``m = mean_l x`` and ``v = mean_l (x - m)^2``, ``dx = dvalues + dm / L + 2 dv (x - m) /
    L``.
    Autograd calls this backward after every use of the three outputs has been differentiated.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        mean, var, wide = _moments(x)
        ctx.save_for_backward(x, mean)
        return mean, var, wide.view_as(wide)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor, grad_values: Tensor) -> Tensor:  # type: ignore[override]
        x, mean = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            positions = x.shape[2]
            slope = (2.0 / positions) * grad_var
            offset = grad_mean / positions - slope * mean
            grad = torch.addcmul(offset.unsqueeze(-1), x, slope.unsqueeze(-1))
            return cast(grad.add_(grad_values), x.dtype)


class GroupSums(NamedTuple):
    """Sufficient statistics of groups (K groups, C channels) relative to a shift.

    ``count`` (K,): values per channel behind each group (``sum_n w_nk * L``);
    ``sum`` (K, C): ``sum w (x - shift)``; ``sum_of_squares`` (K, C): ``sum w (x - shift)^2``.
    The sums of several processes' ``GroupSums`` (same shift) are the ``GroupSums`` of their union.
    """

    count: Tensor
    sum: Tensor
    sum_of_squares: Tensor


def group_sums(
    mean: Tensor,
    var: Tensor,
    positions: int,
    shift: Tensor,
    weights: Tensor | None = None,
    ids: Tensor | None = None,
) -> GroupSums:
    """:class:`GroupSums` of the samples whose moments are ``mean``, ``var`` (N, C).

    Give either ``ids`` (N,), each sample's group, with a per-group ``shift`` (K, C): the sums
    are scattered, whatever K; or ``weights`` (N, K), how much each sample counts for each
    group (probabilities for soft assignments or ModeNorm's gates, zero rows for samples to
    leave out, a column of ones for BatchNorm), with a shared ``shift`` (C,).
    """
    if ids is not None:
        centred = mean - shift.index_select(0, ids)
        empty = mean.new_zeros(shift.shape)
        count = (
            mean.new_zeros(shift.shape[0]).index_add_(0, ids, mean.new_ones(ids.shape)) * positions
        )
        first_sum = empty.index_add(0, ids, centred)
        second_sum = empty.index_add(0, ids, torch.addcmul(var, centred, centred))
    else:
        if weights is None:
            raise ValueError("group_sums needs the samples' ids or weights")
        centred = mean - shift
        count = weights.sum(0) * positions
        first_sum = weights.t() @ centred
        second_sum = weights.t() @ torch.addcmul(var, centred, centred)
    return GroupSums(count, first_sum * positions, second_sum * positions)


def group_moments(sums: GroupSums, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (K, C) from :class:`GroupSums`; a group with no data gets ``shift``
    and 0."""
    count = sums.count.clamp_min(torch.finfo(sums.sum.dtype).tiny).unsqueeze(1)
    offset = sums.sum / count
    var = (sums.sum_of_squares / count - offset * offset).clamp_min(0.0)
    return shift + offset, var


def pooled_moments(
    mean: Tensor,
    var: Tensor,
    positions: int,
    weights: Tensor | None = None,
    ids: Tensor | None = None,
    num_groups: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Group mean, biased variance (K, C) and count (K,) of one process's batch.

    Groups are given by ``ids`` with ``num_groups``, or by ``weights`` (see :func:`group_sums`).
    The shift is each group's own mean of sample means (ids), or the batch's mean over samples
    (weights): a two-pass computation on the small (N, C) moments, so the variance stays
    accurate whatever the distance of the data from zero.
    """
    with torch.no_grad():
        if ids is not None:
            if num_groups is None:
                raise ValueError("pooled_moments needs num_groups with ids")
            empty = mean.new_zeros(num_groups, mean.shape[1])
            total = empty.index_add(0, ids, mean)
            mass = (
                mean.new_zeros(num_groups)
                .index_add_(0, ids, mean.new_ones(ids.shape))
                .clamp_min(1.0)
            )
            shift = total / mass.unsqueeze(1)
        else:
            shift = mean.mean(0) if mean.shape[0] else mean.new_zeros(mean.shape[1])
    sums = group_sums(mean, var, positions, shift, weights, ids)
    group_mean, group_var = group_moments(sums, shift)
    return group_mean, group_var, sums.count


def packed_sums(
    mean: Tensor,
    var: Tensor,
    positions: int,
    weights: Tensor | None = None,
    ids: Tensor | None = None,
    num_groups: int | None = None,
) -> Tensor:
    """The :class:`GroupSums` of the samples as one float64 tensor (K, 2C + 1) around a zero shift.

    Columns: the count, the C sums and the C sums of squares of each group (groups by ``ids``
    with ``num_groups``, or by ``weights`` (N, K), as in :func:`group_sums`). Tensors of
    several batches or processes add up to that of their union, whatever each holds (no
    shift has to agree between them), and :func:`packed_moments` turns the total into
    statistics. Accumulated in float64, ``E[x^2] - E[x]^2`` loses about
    ``2^-52 (mean^2 + var) / var`` of relative accuracy: below float32 rounding unless the
    mean exceeds the standard deviation 10^4 times. Differentiable.
    """
    if ids is not None:
        if num_groups is None:
            raise ValueError("packed_sums needs num_groups with ids")
        shape: tuple[int, ...] = (num_groups, mean.shape[1])
    elif weights is not None:
        shape = (mean.shape[1],)
        weights = weights.double()
    else:
        raise ValueError("packed_sums needs the samples' ids or weights")
    shift = mean.new_zeros(shape, dtype=torch.float64)
    sums = group_sums(mean.double(), var.double(), positions, shift, weights, ids)
    return torch.cat((sums.count.unsqueeze(1), sums.sum, sums.sum_of_squares), dim=1)


def packed_moments(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance (K, C) and count (K,) of :func:`packed_sums` (in their float64)."""
    channels = (packed.shape[1] - 1) // 2
    count, first, second = packed.split((1, channels, channels), dim=1)
    count = count.squeeze(1)
    mean, var = group_moments(GroupSums(count, first, second), first.new_zeros(first.shape))
    return mean, var, count


def affine_coefficients(
    mean: Tensor,
    var: Tensor,
    eps: float,
    gain: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` such that ``x * scale + shift == weight * gain * (x - mean) / sqrt(var +
    eps) + bias``.

    All arguments broadcast against (G, C), where G indexes contexts, components or samples.
    ``gain`` carries the mixture factor ``1/sqrt(lambda_k)`` as a (G, 1) column.
    """
    scale = torch.rsqrt(var + eps)
    if gain is not None:
        scale = scale * gain
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1.0)
    return scale, shift


def apply_sample_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` for ``x`` (N, C, L) and per-sample coefficients (N, C), in ``x``'s
    dtype.

    Computed in the coefficients' precision (float32 for half-precision ``x``) and rounded
    once, as BatchNorm does. Pass :attr:`Moments.values` as ``x`` when the coefficients were
    computed from the moments.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad):
        return _SampleAffine.apply(x, scale, shift)
    return _affine(x, scale, shift)


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return cast(torch.addcmul(shift.unsqueeze(-1), x, scale.unsqueeze(-1)), x.dtype)


class _SampleAffine(torch.autograd.Function):
    """``y = x * scale + shift`` with the coefficient gradients reduced in one pass each."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, scale)
        return _affine(x, scale, shift)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, scale = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            wide = statistics_dtype(x.dtype)
            wide_grad, wide_x = cast(grad, wide), cast(x, wide)
            grad_scale = cast(torch.einsum("ncl,ncl->nc", wide_grad, wide_x), scale.dtype)
            grad_shift = cast(wide_grad.sum(2), scale.dtype)
            grad_x = (
                cast(wide_grad * scale.unsqueeze(-1), x.dtype) if ctx.needs_input_grad[0] else None
            )
        return grad_x, grad_scale, grad_shift


def running_rate(
    num_batches_tracked: Tensor, present: Tensor, momentum: float | None, dtype: torch.dtype
) -> float | Tensor:
    """Count a batch in ``num_batches_tracked`` for the groups ``present`` and return the rate of
    :func:`update_running_moments`.

    ``num_batches_tracked`` and ``present`` are (K,) (batches counted per group) or 0-dim.
    ``momentum=None`` is BatchNorm's cumulative average, ``1 / batches counted``, per group, in
    ``dtype`` (the running statistics'); a float is returned as it is. No value is read on the
    host.
    """
    num_batches_tracked.add_(present)
    if momentum is not None:
        return momentum
    return num_batches_tracked.clamp_min(1).to(dtype).reciprocal()


def update_running_moments(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: Tensor,
    momentum: float | Tensor,
) -> None:
    """BatchNorm's running update, per group, for the groups that had data in the batch.

    The variance is stored unbiased (``count / (count - 1)``), as BatchNorm does; a group with
    count 0 keeps its running statistics untouched. ``momentum`` may be a (K,) or 0-dim tensor (the
    cumulative average of ``momentum=None``). No value is read on the host.
    """
    with torch.no_grad():
        # count / (count - 1) for count > 1, 1 for count 1; a group without data (count 0) gets
        # rate 0, and lerp with weight 0 leaves its running statistics exactly as they were.
        dtype = running_mean.dtype
        correction = count / (count - 1.0).clamp_min(1.0)
        if isinstance(momentum, Tensor):
            momentum = momentum.reshape(-1, 1)
        rate = (count > 0).unsqueeze(1).to(dtype).mul_(momentum)
        running_mean.lerp_(cast(batch_mean, dtype), rate)
        running_var.lerp_(cast(batch_var * correction.unsqueeze(1), dtype), rate)
