"""Turning a layer's ``context`` argument into sample-to-context weights, with clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ContextAssignment"]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class ContextAssignment:
    """How much each sample belongs to each context.

    ``weights`` (N, K): one-hot rows for known ids, the given probabilities for soft
    assignments, zero rows where the context is unknown (``unknown`` marks those; it is
    ``None`` when every context is known). ``ids`` (N,) is set when every sample has a
    known hard context, so that per-context tables can be indexed instead of mixed.
    """

    weights: Tensor
    unknown: Tensor | None
    ids: Tensor | None = None

    @property
    def soft(self) -> bool:
        """Whether the rows came as probabilities rather than ids."""
        return self.ids is None and self.unknown is None

    def rows(self, table: Tensor) -> Tensor:
        """Each sample's row of a per-context table (K, C): (N, C)."""
        if self.ids is not None:
            return table.index_select(0, self.ids)
        return self.weights @ table

    @property
    def has_unknown(self) -> bool:
        return self.unknown is not None

    def with_posterior(self, posterior: Tensor) -> Tensor:
        """The weights with each unknown row replaced by that sample's posterior over contexts."""
        if self.unknown is None:
            return self.weights
        return torch.where(self.unknown.unsqueeze(1), posterior.to(self.weights.dtype), self.weights)

    @classmethod
    def from_context(
        cls, context: object, batch_size: int, num_contexts: int, device: torch.device, dtype: torch.dtype
    ) -> ContextAssignment:
        """Validate a ``context`` argument; every error names the argument and the fix.

        Accepted: int64 ids (N,) in [0, K) with -1 for unknown, float probabilities (N, K),
        or ``None`` (every context unknown).
        """
        if context is None:
            return cls(
                torch.zeros(batch_size, num_contexts, device=device, dtype=dtype),
                torch.ones(batch_size, dtype=torch.bool, device=device),
            )
        if not isinstance(context, Tensor):
            raise TypeError(
                "context must be a torch.Tensor of int64 ids (N,) or soft assignments (N, K), or None; "
                f"got {type(context).__name__}"
            )
        if context.dtype == torch.bool:
            raise TypeError("context must hold int64 context ids, not booleans; convert it with context.long()")
        if context.is_floating_point():
            return cls(_soft_weights(context, batch_size, num_contexts, device, dtype), None)
        if context.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"context ids must be an integer tensor (int64), got dtype {context.dtype}")
        if context.dim() != 1 or context.shape[0] != batch_size:
            raise ValueError(
                f"context ids must have shape (N,) = ({batch_size},) to match the batch, got {tuple(context.shape)}"
            )
        ids = context.to(device=device, dtype=torch.int64)
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < -1 or high >= num_contexts:
            raise ValueError(
                f"context ids must lie in [0, {num_contexts}) (or be -1 for an unknown context), got values in "
                f"[{low}, {high}]; check that num_contexts={num_contexts} matches how the contexts were built"
            )
        unknown = ids < 0
        weights = torch.nn.functional.one_hot(ids.clamp_min(0), num_contexts).to(dtype)
        if low >= 0:
            return cls(weights, None, ids)
        return cls(weights * (~unknown).unsqueeze(1).to(dtype), unknown)


def _soft_weights(context: Tensor, batch_size: int, num_contexts: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if context.dim() != 2 or tuple(context.shape) != (batch_size, num_contexts):
        raise ValueError(
            f"soft context assignments must have shape (N, K) = ({batch_size}, {num_contexts}), got "
            f"{tuple(context.shape)}; for hard ids pass an int64 tensor of shape (N,)"
        )
    weights = context.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("soft context assignments must be finite and non-negative probabilities")
    row_sums = weights.sum(1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3):
        raise ValueError(
            "soft context assignments must sum to 1 over the K contexts of each sample; "
            "normalise them first, e.g. context / context.sum(1, keepdim=True)"
        )
    return weights
