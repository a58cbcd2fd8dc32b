"""Checking a ``context`` once where it enters, and turning it into sample-to-context weights.

Checking the values of a context (ids in range, probabilities that sum to 1) reads them on
the host, which stalls an accelerator and breaks a compiled graph. So the values are checked
once per batch where the context enters (:func:`check_context`, called by
:func:`~contextnorm.use_context`, :class:`~contextnorm.ContextualModel`, or a layer called
with an explicit context), and the layers only compare what the check found with their own
number of contexts: a Python comparison, no tensor read. The shape and dtype checks cost
nothing and always run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CheckedContext", "ContextAssignment", "check_context"]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class CheckedContext:
    """A context whose values were checked, with what the check read on the host.

    ``low``, ``high``: the smallest and largest id (hard ids; ``None`` otherwise);
    ``singletons``: the ids held by exactly one sample of the batch.
    """

    value: Tensor | None
    low: int | None = None
    high: int | None = None
    singletons: tuple[int, ...] = ()


_UNCHECKABLE = (
    "contexts are checked by reading their values on the host, which a traced or exported graph "
    "cannot do, and a traced graph would keep only the path of the example's ids; turn the check "
    "off "
    "where the contexts enter the traced code (the layers' validate_context=False, "
    "ContextualModel(model, validate=False) or use_context(context, validate=False)) and check the "
    "contexts before the call with contextnorm.check_context if needed. Unchecked, ids of -1 are "
    "handled in the graph (the posterior mixture); ids out of range are not detected."
)


def _check_context(context: object, num_contexts: int | None = None) -> CheckedContext:
    """Check the values of a ``context`` (one host read); every error names the argument and the
    fix.

    Accepted: integer ids (N,) with -1 for an unknown context, float probabilities (N, K)
    that sum to 1 per sample, or ``None`` (every context unknown). Ids are compared with
    ``num_contexts`` when it is given, and with each layer's own when the layer runs. Inside
    ``torch.compile`` this function runs outside the graph (a graph break); ``torch.export``
    and tracing refuse it with an error that names the switch that turns it off.
    """
    if isinstance(context, CheckedContext):
        return context
    if context is None:
        return CheckedContext(None)
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        raise RuntimeError(f"Cannot export or trace with context checks on: {_UNCHECKABLE}")
    _check_kind(context)
    assert isinstance(context, Tensor)
    if context.is_floating_point():
        if context.dim() == 2 and context.numel():
            if not bool(torch.isfinite(context).all()) or bool((context < 0).any()):
                raise ValueError(
                    "soft context assignments must be finite and non-negative probabilities"
                )
            row_sums = context.sum(1)
            if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3):
                raise ValueError(
                    "soft context assignments must sum to 1 over the K contexts of each sample; "
                    "normalise them first, e.g. context / context.sum(1, keepdim=True)"
                )
        return CheckedContext(context)
    if context.dim() != 1:
        raise ValueError(f"context ids must have shape (N,), got {tuple(context.shape)}")
    if context.numel() == 0:
        return CheckedContext(context)
    ids = context.long()
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < -1:
        _range_error(low, high, num_contexts)
    # counts[0] is the number of unknown samples, counts[k + 1] that of context k.
    counts = torch.bincount(ids + 1)
    singletons = tuple(torch.nonzero(counts[1:] == 1).flatten().tolist())
    checked = CheckedContext(context, low, high, singletons)
    if num_contexts is not None:
        _check_range(checked, num_contexts)
    return checked


check_context = torch.compiler.disable(_check_context, reason=_UNCHECKABLE)


def _check_range(checked: CheckedContext, num_contexts: int) -> None:
    if checked.high is not None and checked.high >= num_contexts:
        _range_error(checked.low, checked.high, num_contexts)


def _range_error(low: int | None, high: int | None, num_contexts: int | None) -> None:
    bound = "K" if num_contexts is None else str(num_contexts)
    hint = (
        ""
        if num_contexts is None
        else (f"; check that num_contexts={num_contexts} matches how the contexts were built")
    )
    raise ValueError(
        f"context ids must lie in [0, {bound}) (or be -1 for an unknown context), got values in "
        f"[{low}, {high}]{hint}"
    )


def _check_kind(context: object) -> None:
    if not isinstance(context, Tensor):
        raise TypeError(
            "context must be a torch.Tensor of int64 ids (N,) or soft assignments (N, K), or None; "
            f"got {type(context).__name__}"
        )
    if context.dtype == torch.bool:
        raise TypeError(
            "context must hold int64 context ids, not booleans; convert it with context.long()"
        )
    if not context.is_floating_point() and context.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"context ids must be an integer tensor (int64), got dtype {context.dtype}")


class ContextAssignment:
    """How much each sample belongs to each context, for one layer call.

    ``ids`` (N,): each sample's context (clamped to 0 where unknown) for hard contexts,
    ``None`` for soft ones. ``unknown`` (N,) marks the samples whose context is unknown; it
    is ``None`` when no sample can be unknown (a checked batch without -1, or soft
    assignments), so the layers skip the posterior. ``weights`` (N, K): one-hot rows for
    known ids, the given probabilities, zero rows where unknown (built on first use).
    ``checked``: the context's values were checked (so ``unknown`` is set only when a sample
    is unknown, and ``singletons`` lists the ids held by one sample).
    """

    def __init__(
        self,
        num_contexts: int,
        ids: Tensor | None,
        unknown: Tensor | None,
        soft_weights: Tensor | None,
        singletons: tuple[int, ...],
        dtype: torch.dtype,
        checked: bool = False,
    ) -> None:
        self.num_contexts = num_contexts
        self.ids = ids
        self.unknown = unknown
        self.singletons = singletons
        self.checked = checked
        self._dtype = dtype
        self._weights = soft_weights

    @property
    def soft(self) -> bool:
        """Whether the rows came as probabilities rather than ids."""
        return self.ids is None and self.unknown is None

    @property
    def known_ids(self) -> Tensor | None:
        """The ids when every sample's context is a known id, else ``None``."""
        return self.ids if self.unknown is None else None

    @property
    def weights(self) -> Tensor:
        if self._weights is None:
            assert self.ids is not None
            contexts = torch.arange(self.num_contexts, device=self.ids.device)
            weights = (self.ids.unsqueeze(1) == contexts).to(self._dtype)
            if self.unknown is not None:
                weights = weights * (~self.unknown).unsqueeze(1).to(self._dtype)
            self._weights = weights
        return self._weights

    def with_posterior(self, posterior: Tensor) -> Tensor:
        """The weights with each unknown row replaced by that sample's posterior over contexts."""
        if self.unknown is None:
            return self.weights
        return torch.where(self.unknown.unsqueeze(1), posterior.to(self._dtype), self.weights)

    @classmethod
    def from_context(
        cls,
        context: object,
        batch_size: int,
        num_contexts: int,
        device: torch.device,
        dtype: torch.dtype,
        validate: bool = True,
    ) -> ContextAssignment:
        """The assignment of a layer with ``num_contexts`` contexts to a batch of ``batch_size``.

        ``context``: a :class:`CheckedContext` (checked where it entered), or a raw context,
        checked here when ``validate`` (one host read) and otherwise only for shape and dtype.
        Without a check, hard ids may hold -1, so the layer handles unknown contexts with
        ``torch.where`` instead of a branch; ids out of range are not detected.
        """
        if validate and not isinstance(context, CheckedContext):
            context = check_context(context, num_contexts)
        checked = context if isinstance(context, CheckedContext) else None
        value = checked.value if checked is not None else context
        if value is None:
            return cls(
                num_contexts,
                None,
                torch.ones(batch_size, dtype=torch.bool, device=device),
                torch.zeros(batch_size, num_contexts, device=device, dtype=dtype),
                (),
                dtype,
                True,
            )
        _check_kind(value)
        assert isinstance(value, Tensor)
        if value.is_floating_point():
            if value.dim() != 2 or tuple(value.shape) != (batch_size, num_contexts):
                raise ValueError(
                    f"soft context assignments must have shape (N, K) = ({batch_size}, "
                    f"{num_contexts}), got "
                    f"{tuple(value.shape)}; for hard ids pass an int64 tensor of shape (N,)"
                )
            return cls(
                num_contexts,
                None,
                None,
                value.to(device=device, dtype=dtype),
                (),
                dtype,
                checked is not None,
            )
        if value.dim() != 1 or value.shape[0] != batch_size:
            raise ValueError(
                f"context ids must have shape (N,) = ({batch_size},) to match the batch, got "
                f"{tuple(value.shape)}"
            )
        ids = value.to(device=device, dtype=torch.int64)
        if checked is None:
            unknown = ids < 0
            return cls(num_contexts, ids.clamp_min(0), unknown, None, (), dtype)
        _check_range(checked, num_contexts)
        if checked.low is not None and checked.low < 0:
            return cls(
                num_contexts, ids.clamp_min(0), ids < 0, None, checked.singletons, dtype, True
            )
        return cls(num_contexts, ids, None, None, checked.singletons, dtype, True)
