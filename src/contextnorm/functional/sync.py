"""Group statistics over the processes of a group: one all-reduce forward, one backward.

A batch split over processes has the group statistics of the whole batch when every process
adds its :class:`~contextnorm.functional.GroupSums` (count, sum, sum of squares per group,
relative to the same shift) to every other's: one all-reduce of ``K * (2C + 1)`` values, never
an all-gather of activations. The all-reduce is differentiable: each process's sums enter
every process's statistics, so the gradient of a process's sums is the sum over processes of
the gradients of the reduced sums, which the backward all-reduces in turn (the same pattern as
``torch.nn.SyncBatchNorm``'s backward, which all-reduces ``sum_dy`` and ``sum_dy_xmu``).

The sums are :func:`~contextnorm.functional.packed_sums`: float64 around a zero shift, the
same on every process by construction (no buffer has to agree across processes). The reduced
``(K, 2C + 1)`` tensor is tiny; the cost is that of the collective.

Every process must call these functions the same number of times, in the same order, with
the same ``K`` and ``C`` (a process with an empty batch included: its sums are zeros).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .moments import packed_moments, packed_sums

__all__ = ["all_reduce_sum", "synced_pooled_moments", "agree_across_processes"]


def all_reduce_sum(value: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum of ``value`` over the processes of ``group``, differentiable.

    The backward all-reduces the incoming gradient: every process's ``value`` reaches every
    process's result, so its gradient is the sum of all processes' gradients of the result.
    """
    return _AllReduceSum.apply(value, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        total = value.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def synced_pooled_moments(
    mean: Tensor,
    var: Tensor,
    positions: int,
    group: dist.ProcessGroup | None = None,
    weights: Tensor | None = None,
    ids: Tensor | None = None,
    num_groups: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~contextnorm.functional.pooled_moments` of the batch of every process of ``group``.

    Each process passes the per-sample moments (N, C) of its own batch (N may differ between
    processes, and be 0); every process gets the same group mean and biased variance (K, C) in
    ``mean``'s dtype, and the groups' counts (K,) in float64, as one process would on the
    concatenated batch. Gradients flow to every process's ``mean``, ``var`` and ``weights``
    through one all-reduce in the backward.
    """
    packed = packed_sums(mean, var, positions, weights, ids, num_groups)
    group_mean, group_var, count = packed_moments(all_reduce_sum(packed, group))
    return group_mean.to(mean.dtype), group_var.to(mean.dtype), count


def agree_across_processes(
    values: dict[str, int], group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, tuple[int, int]]:
    """The names in ``values`` whose integer differs between processes, with its range.

    One all-reduce of ``2 * len(values)`` integers on ``device`` (the values and their
    negations, reduced by maximum), read on the host; every process gets the same answer. Run
    it before a collective whose size depends on the values, so that a mismatch raises on every
    process instead of hanging or mixing unrelated tensors.
    """
    numbers = torch.tensor(list(values.values()), dtype=torch.int64, device=device)
    extremes = torch.cat((numbers, -numbers))
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    high, negated_low = extremes.view(2, -1).tolist()
    return {
        name: (-least, greatest)
        for name, greatest, least in zip(values, high, negated_low, strict=True)
        if greatest != -least
    }
