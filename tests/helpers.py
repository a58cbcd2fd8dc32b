"""What the layer tests share: calling any layer, gradcheck on fresh copies, the per-context
reference."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

import contextnorm as cn


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the layer tests are many small operations, which a second
    thread waiting for a busy core slows down by an order of magnitude on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def layer_factories(channels: int, contexts: int) -> dict[str, Callable[..., nn.Module]]:
    """Builders ``name -> (**options) -> layer`` of the layers with per-sample statistics."""
    return {
        "cn": lambda **options: cn.ContextNorm(channels, contexts, **options),
        "cnx": lambda **options: cn.ContextNormX(channels, contexts, **options),
        "cne": lambda **options: cn.ContextNormE(channels, contexts, **options),
        "modenorm": lambda **options: cn.ModeNorm(channels, contexts, **options),
        "switchnorm": lambda **options: cn.SwitchNorm(channels, **options),
    }


def call(layer: nn.Module, x: Tensor, context: Tensor | None = None) -> Tensor:
    """``layer(x, context)`` for context layers, ``layer(x)`` for the others."""
    return layer(x, context) if getattr(layer, "uses_context", False) else layer(x)


def gradcheck_fresh(
    layer: nn.Module,
    x: Tensor,
    context: Tensor | None = None,
    *,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    fast_mode: bool = False,
) -> bool:
    """``torch.autograd.gradcheck`` of ``layer(x, context)`` w.r.t. ``x`` and every parameter.

    Every evaluation (the analytical one and each numerical perturbation) runs on a fresh
    deep copy of the layer's state as it is now, so an update of running statistics, a
    momentum step or a data-dependent initialisation made by one evaluation can never hide a
    wrong gradient by changing what the next one computes. A layer that initialises itself
    from its first training batch must have seen one before (call it once first). ``x``
    must be float64 and the layer converted with ``.double()``. ``fast_mode`` compares
    random projections of the Jacobians (gradcheck's fast mode), which catches the same
    errors in a fraction of the evaluations.
    """
    saved = copy.deepcopy(layer)
    names = [name for name, _ in saved.named_parameters()]
    parameters = [p.detach().clone().requires_grad_() for _, p in saved.named_parameters()]
    x = x.detach().clone().requires_grad_()

    def function(x: Tensor, *values: Tensor) -> Tensor:
        fresh = copy.deepcopy(saved)
        arguments = (x, context) if getattr(fresh, "uses_context", False) else (x,)
        return torch.func.functional_call(fresh, dict(zip(names, values, strict=True)), arguments)

    return torch.autograd.gradcheck(
        function, (x, *parameters), eps=eps, atol=atol, rtol=rtol, fast_mode=fast_mode
    )


def reference_context_norm(
    x: Tensor,
    context: Tensor,
    weight: Tensor,
    bias: Tensor,
    prior: Tensor | None,
    eps: float,
    statistics: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The papers' transform, one context at a time (002 Alg. 1): ``gamma_k xhat / sqrt(lambda_k) +
    beta_k``.

    ``statistics``: per-context mean and variance (K, C) to normalise with (CN-X, CN in
    eval); ``None`` takes each context's batch mean and biased variance (CN in training).
    ``prior`` ``None``: no ``1/sqrt(lambda)`` factor.
    """
    out = torch.empty_like(x)
    dims: Sequence[int] = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    for k in context.unique().tolist():
        rows = context == k
        members = x[rows]
        if statistics is None:
            mean = members.mean(dims, keepdim=True)
            var = members.var(dims, unbiased=False, keepdim=True)
        else:
            mean, var = statistics[0][k].view(shape), statistics[1][k].view(shape)
        xhat = (members - mean) / torch.sqrt(var + eps)
        if prior is not None:
            xhat = xhat / torch.sqrt(prior[k])
        out[rows] = weight[k].view(shape) * xhat + bias[k].view(shape)
    return out
