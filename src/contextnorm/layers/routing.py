"""Routing contexts to layers deep inside a model, without editing the model's ``forward``.

A model converted to context layers still calls each norm as ``norm(x)``. The contexts of
the current batch are put in scope around the call::

    with contextnorm.use_context(context):
        logits = model(images)

The scope is a :class:`contextvars.ContextVar`: nested scopes restore the outer one on
exit, an exception inside the block cannot leak its context into the next call, and
threads do not see each other's contexts. A context layer that runs with no context in
scope, and none passed to it, raises an error naming the ways to give one.

The context's values are checked once, when the scope opens (``validate=True``, the
default); the layers then run without reading any tensor on the host. Inside
``torch.compile`` the scope is kept in the traced program instead of the ContextVar (which
the compiler cannot trace), so a compiled :class:`ContextualModel` routes its contexts
without graph breaks; pass ``validate=False`` there, since the check reads the ids on the
host, and check them before the compiled call if needed (:func:`check_context`).

Code that re-runs the forward outside the ``with`` block does not see the scope:
activation checkpointing recomputes in the backward pass, so use :func:`checkpoint`, which
carries the forward's contexts into the recomputation; ``nn.DataParallel`` worker threads
do not see it either (use :class:`ContextualModel`, which takes the context as an argument).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .assignment import check_context

__all__ = [
    "use_context",
    "current_context",
    "ContextualModel",
    "checkpoint",
    "convert",
    "uses_context",
    "MISSING",
]


class _Missing:
    """Sentinel: no context was passed (distinct from ``None``, which means "unknown")."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class _Scope:
    """A context in scope; ``replay``: restored by :func:`checkpoint` for a recomputation."""

    context: Any
    replay: bool = False


_ACTIVE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "contextnorm_context", default=None
)
# The scopes opened inside a program being traced by torch.compile (a single-threaded trace:
# entries are pushed and popped within it, so it is empty outside one).
_TRACED: list[_Scope] = []


@contextmanager
def _enter(scope: _Scope) -> Iterator[None]:
    if torch.compiler.is_compiling():
        _TRACED.append(scope)
        try:
            yield
        finally:
            _TRACED.pop()
        return
    token = _ACTIVE.set(scope)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _current_scope() -> _Scope | None:
    if torch.compiler.is_compiling() and _TRACED:
        return _TRACED[-1]
    return _ACTIVE.get()


@contextmanager
def use_context(context: Tensor | None, validate: bool = True) -> Iterator[None]:
    """Make ``context`` the context of every context layer called inside the block.

    ``context``: int64 ids (N,) in [0, K) with -1 for an unknown context, a float tensor
    (N, K) of soft assignments, or ``None`` for "unknown for the whole batch" (each layer
    then normalises with its posterior mixture over contexts).

    ``validate``: check the values here, once for all the layers (ids >= -1, probabilities
    finite, non-negative and summing to 1; each layer then compares the largest id with its
    ``num_contexts`` without reading the tensor again). Checking reads the ids on the host;
    ``validate=False`` skips it (compiled models), and ids out of range then go undetected.
    """
    value = check_context(context) if validate else context
    with _enter(_Scope(value)):
        yield


def current_context(explicit: Any, layer: nn.Module) -> tuple[Any, bool]:
    """The context a layer must use and whether the layer must check it.

    The one passed to the layer (checked when the layer's ``validate_context`` is set), else
    the one in scope (checked when the scope opened), else an error naming the fix.
    """
    if explicit is not MISSING:
        return explicit, bool(getattr(layer, "validate_context", True))
    scope = _current_scope()
    # A layer running inside the autograd engine is being recomputed by activation checkpointing.
    recomputing = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
    if scope is None or (recomputing and not scope.replay):
        description = f"{layer.__class__.__name__}({layer.extra_repr()})"
        if recomputing:
            raise RuntimeError(
                f"{description} is being recomputed in the backward pass (activation "
                "checkpointing), "
                "where the forward's context scope is gone. Checkpoint with "
                "contextnorm.checkpoint(...), "
                "which takes the arguments of torch.utils.checkpoint.checkpoint and replays the "
                "forward's contexts, or pass the context to the layer explicitly."
            )
        raise RuntimeError(
            f"{description} ran without a context. Call it as layer(x, context), or run the model "
            "inside "
            "`with contextnorm.use_context(context):` (or through contextnorm.ContextualModel); "
            "for an "
            "unknown context pass None or ids of -1."
        )
    return scope.context, False


def checkpoint(
    function: Callable[..., Any], *args: Any, use_reentrant: bool = False, **kwargs: Any
) -> Any:
    """:func:`torch.utils.checkpoint.checkpoint` that recomputes with the forward's contexts.

    The recomputation runs in the backward pass, outside any ``use_context`` block (and, on
    an accelerator, on another thread). This captures the context in scope when the forward
    runs and restores it around the recomputation, for the reentrant and the non-reentrant
    variant alike. Arguments are those of ``torch.utils.checkpoint.checkpoint``.
    """
    scope = _current_scope()

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        if scope is None:
            return function(*inner_args, **inner_kwargs)
        with _enter(_Scope(scope.context, replay=True)):
            return function(*inner_args, **inner_kwargs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=use_reentrant, **kwargs)


class ContextualModel(nn.Module):
    """Wrap a model so that its forward takes the batch's contexts as an argument.

    ``ContextualModel(model)(x, context)`` runs ``model(x)`` inside
    ``use_context(context, validate)``; extra positional and keyword arguments go to the
    model. Use ``validate=False`` for a model compiled with ``torch.compile``.
    """

    def __init__(self, model: nn.Module, validate: bool = True) -> None:
        super().__init__()
        self.model = model
        self.validate = bool(validate)

    def forward(self, x: Any, context: Tensor | None, *args: Any, **kwargs: Any) -> Any:
        with use_context(context, validate=self.validate):
            return self.model(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return "" if self.validate else "validate=False"


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

    Every ``torch.nn.modules.batchnorm._BatchNorm`` is replaced: ``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, and lazy BatchNorms once they have seen an input. ``layer`` is a
    contextnorm layer class (or any class with a ``from_batchnorm`` classmethod), which
    copies what carries over: the affine parameters into every context, and the running
    statistics into every context (CN), into the learned statistics (CN-X, CN-E), or into the
    running estimates (the other layers); each replacement keeps the BatchNorm's device,
    dtype, ``training`` flag, ``eps``, ``momentum`` (``None`` included) and
    ``track_running_stats``. ``num_contexts`` is the number of contexts or components where
    the layer has one; ``options`` go to its constructor. Any other callable is used as a
    factory ``layer(bn) -> nn.Module``.

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
        raise ValueError(
            f"convert found no BatchNorm layer in {model.__class__.__name__}: nothing to replace"
        )
    return model


def _replacement(
    bn: nn.modules.batchnorm._BatchNorm,
    layer: type[nn.Module] | Callable[..., nn.Module],
    num_contexts: int | None,
    options: dict[str, Any],
) -> nn.Module:
    from_batchnorm = getattr(layer, "from_batchnorm", None)
    if from_batchnorm is None:
        return layer(bn)
    if num_contexts is None:
        return from_batchnorm(bn, **options)
    return from_batchnorm(bn, num_contexts, **options)
