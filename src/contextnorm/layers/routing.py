"""Routing contexts to layers deep inside a model, without editing the model's ``forward``.

A model converted to context layers still calls each norm as ``norm(x)``. The contexts of
the current batch are put in scope around the call::

    with contextnorm.use_context(context):
        logits = model(images)

The scope is a :class:`contextvars.ContextVar`: nested scopes restore the outer one on
exit, an exception inside the block cannot leak its context into the next call, and
threads do not see each other's contexts. A context layer that runs with no context in
scope, and none passed to it, raises an error naming the two ways to give one.

Known limits of a scope: code that re-runs the forward outside the ``with`` block
(``torch.utils.checkpoint`` recomputing in backward, ``nn.DataParallel`` worker threads)
does not see it. :class:`ContextualModel` takes the context as a forward argument, which
suits trainers and ``DistributedDataParallel``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["use_context", "current_context", "ContextualModel", "convert", "uses_context", "MISSING"]


class _Missing:
    """Sentinel: no context was passed (distinct from ``None``, which means "unknown")."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("contextnorm_context", default=MISSING)


@contextmanager
def use_context(context: Tensor | None) -> Iterator[None]:
    """Make ``context`` the context of every context layer called inside the block.

    ``context``: int64 ids (N,) in [0, K) with -1 for an unknown context, a float tensor
    (N, K) of soft assignments, or ``None`` for "unknown for the whole batch" (each layer
    then normalises with its posterior mixture over contexts).
    """
    token = _ACTIVE.set(context)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_context(explicit: Any, layer: nn.Module) -> Tensor | None:
    """The context a layer must use: the one passed to it, else the one in scope, else an error."""
    if explicit is not MISSING:
        return explicit
    scoped = _ACTIVE.get()
    if scoped is MISSING:
        raise RuntimeError(
            f"{layer.__class__.__name__}({layer.extra_repr()}) ran without a context. Call it as "
            f"layer(x, context), or run the model inside `with contextnorm.use_context(context):`; "
            f"for an unknown context pass None or ids of -1."
        )
    return scoped


class ContextualModel(nn.Module):
    """Wrap a model so that its forward takes the batch's contexts as an argument.

    ``ContextualModel(model)(x, context)`` runs ``model(x)`` inside ``use_context(context)``;
    extra positional and keyword arguments go to the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any, context: Tensor | None, *args: Any, **kwargs: Any) -> Any:
        with use_context(context):
            return self.model(x, *args, **kwargs)


def uses_context(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule needs a context when it runs."""
    return any(getattr(m, "uses_context", False) for m in module.modules())


def convert(
    model: nn.Module,
    layer: type[nn.Module] | Callable[..., nn.Module],
    num_contexts: int | None = None,
    **options: Any,
) -> nn.Module:
    """Replace every BatchNorm of ``model`` (at any depth) by ``layer``, in place; return the model.

    ``layer`` is a contextnorm layer class (or any class with a ``from_batchnorm``
    classmethod), which copies what carries over: the affine parameters into every context,
    and the running statistics into every context (CN), into the learned statistics (CN-X,
    CN-E), or into the running estimates (the other layers). ``num_contexts`` is the number
    of contexts or components where the layer has one; ``options`` go to its constructor.
    Any other callable is used as a factory ``layer(bn) -> nn.Module``.

    The converted model is run with its contexts through :func:`use_context` or
    :class:`ContextualModel`.
    """
    batchnorms = (nn.modules.batchnorm._BatchNorm,)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, batchnorms):
                setattr(parent, name, _replacement(child, layer, num_contexts, options))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"convert found no BatchNorm layer in {model.__class__.__name__}: nothing to replace")
    return model


def _replacement(
    bn: nn.modules.batchnorm._BatchNorm,
    layer: type[nn.Module] | Callable[..., nn.Module],
    num_contexts: int | None,
    options: dict[str, Any],
) -> nn.Module:
    from_batchnorm = getattr(layer, "from_batchnorm", None)
    if from_batchnorm is None:
        new = layer(bn)
    elif num_contexts is None:
        new = from_batchnorm(bn, **options)
    else:
        new = from_batchnorm(bn, num_contexts, **options)
    reference = bn.weight if bn.weight is not None else bn.running_mean
    if reference is not None:
        new = new.to(device=reference.device)
    return new
