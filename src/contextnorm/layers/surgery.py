"""Model surgery: one context's plain BatchNorm model, and statistics re-estimated on new data.

:func:`extract_context` turns a model with context layers into an ordinary model for one
context (a domain, a cluster): every CN, CN-X and CN-E becomes the ``nn.BatchNorm1d/2d/3d``
that computes, in eval mode, what the layer computes for that context, so that any tool that
knows BatchNorm (export, quantisation, conv-BN folding, serving) takes it.

:func:`recalibrate` re-estimates the running statistics of every layer that keeps them
(BatchNorm's, and each context's of CN) from data, as ``torch.optim.swa_utils.update_bn`` and
AdaBN do, but as exact population statistics: the mean and unbiased variance over all samples
of each context, not an average of batch statistics.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .base import NormBase, active_group
from .context import ContextNorm, ContextNormE, ContextNormX
from .routing import ContextualModel, use_context
from .sync import SyncBatchNorm

__all__ = ["extract_context", "recalibrate"]

_CONTEXT_LAYERS = (ContextNorm, ContextNormX, ContextNormE)
_PROGRESS_EVERY_S = 10.0
"""Seconds between two progress lines when tqdm is not installed."""
_BATCHNORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def extract_context(model: nn.Module, context: int, example_input: Any = None) -> nn.Module:
    """A copy of ``model`` in which every CN, CN-X and CN-E layer is a BatchNorm for ``context``.

    Each context layer becomes an ordinary ``nn.BatchNorm1d/2d/3d`` holding that context's
    eval statistics (CN's running ones, CN-X's learned ones, CN-E's encoded ones) and affine,
    with the prior gain ``1/sqrt(lambda_k)`` folded into the weight, so that in eval mode the
    copy computes exactly what ``model`` computes with every sample in ``context``, and needs no
    context. Every other module is copied as it is (its ``training`` flag too).

    Args:
        model: a model holding context layers (e.g. from :func:`contextnorm.convert`), or one.
        context: the context id ``k``, in ``[0, num_contexts)`` of every context layer.
        example_input: an input of ``model`` (a tensor, or a tuple of its arguments), run once
            in eval mode to see the rank of each layer's input: (N, C) and (N, C, L) get
            ``BatchNorm1d``, (N, C, H, W) ``BatchNorm2d``, (N, C, D, H, W) ``BatchNorm3d``.
            Without it every layer becomes a ``BatchNorm2d`` (image models), which raises on
            input of another rank.

    Raises:
        ValueError: ``model`` holds no context layer; ``context`` is out of range of a layer;
            a layer normalises channel-last input ((N, *, C), e.g. tokens), which BatchNorm
            (channels at dim 1) cannot represent.
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _CONTEXT_LAYERS)
    ]
    if not found:
        raise ValueError(
            f"extract_context found no context layer (ContextNorm, ContextNormX, ContextNormE) in "
            f"{type(model).__name__}: there is no context to extract"
        )
    if isinstance(context, bool) or not isinstance(context, int):
        raise TypeError(f"context must be an int context id, got {type(context).__name__}")
    for name, layer in found:
        where = f"layer {name!r}" if name else "the layer"
        if not 0 <= context < layer.num_contexts:
            raise ValueError(
                f"context={context} is out of range for {where} ({type(layer).__name__} with "
                f"num_contexts={layer.num_contexts}); pass an id in [0, {layer.num_contexts})"
            )
        if layer.channel_last:
            raise ValueError(
                f"{where} normalises channel-last input (N, *, C), which BatchNorm (channels at "
                "dim 1) cannot represent; extract_context handles layers with channel-first input"
            )
    copied = copy.deepcopy(model)
    ranks = _input_ranks(copied, context, example_input) if example_input is not None else {}
    if isinstance(copied, _CONTEXT_LAYERS):
        return _batchnorm_for(copied, context, ranks.get(copied, 4))
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _CONTEXT_LAYERS):
                setattr(parent, name, _batchnorm_for(child, context, ranks.get(child, 4)))
    return copied


def _input_ranks(model: nn.Module, context: int, example_input: Any) -> dict[nn.Module, int]:
    """Each context layer's input rank when ``model`` runs ``example_input`` for ``context``."""
    ranks: dict[nn.Module, int] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        ranks.setdefault(module, args[0].dim())

    hooks = [
        module.register_forward_pre_hook(record)
        for module in model.modules()
        if isinstance(module, _CONTEXT_LAYERS)
    ]
    arguments = example_input if isinstance(example_input, tuple) else (example_input,)
    flags = {module: module.training for module in model.modules()}
    batch = arguments[0].shape[0]
    try:
        model.eval()
        with torch.no_grad(), use_context(torch.full((batch,), context, dtype=torch.long)):
            model(*arguments)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in flags.items():
            module.training = training
    return ranks


def _batchnorm_for(layer: NormBase, context: int, rank: int) -> nn.modules.batchnorm._BatchNorm:
    """The BatchNorm that computes, in eval mode, what ``layer`` computes for ``context``."""
    if rank not in _BATCHNORM_BY_RANK:
        raise ValueError(f"a BatchNorm takes input of 2 to 5 dimensions; the layer got {rank}")
    batch_statistics = isinstance(layer, ContextNorm) and not layer.track_running_stats
    with torch.no_grad():
        if isinstance(layer, ContextNorm):
            mean = layer.running_mean[context] if layer.track_running_stats else None
            var = layer.running_var[context] if layer.track_running_stats else None
        else:
            table_mean, table_var = layer._learned_statistics()
            mean, var = table_mean[context], table_var[context]
        gain = layer._gain()
        scale = None if gain is None else gain[context]
        weight = layer.weight
        if weight is not None:
            weight = weight[context] if weight.dim() == 2 else weight
            scale = weight if scale is None else weight * scale
        bias = layer.bias
        if bias is not None and bias.dim() == 2:
            bias = bias[context]
        reference = layer.prior
        norm = _BATCHNORM_BY_RANK[rank](
            layer.num_features,
            eps=layer.eps,
            momentum=getattr(layer, "momentum", 0.1),
            affine=scale is not None or bias is not None,
            track_running_stats=not batch_statistics,
            device=reference.device,
            dtype=(mean if mean is not None else reference).dtype,
        )
        if norm.affine:
            norm.weight.copy_(scale if scale is not None else torch.ones_like(norm.weight))
            norm.bias.copy_(bias if bias is not None else torch.zeros_like(norm.bias))
        if mean is not None:
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            if isinstance(layer, ContextNorm):
                norm.num_batches_tracked.copy_(layer.num_batches_tracked[context])
    norm.train(layer.training)
    return norm


def recalibrate(model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> nn.Module:
    """Re-estimate the running statistics of ``model``'s norm layers from ``batches``, in place.

    As ``torch.optim.swa_utils.update_bn`` (and AdaBN, on a new domain's data), the model runs
    once over the data in training mode, without gradients; but each layer's statistics become
    the exact population statistics of what it saw: per group (context of CN, mode of ModeNorm,
    the whole batch of SwitchNorm and BatchNorm), the mean and the unbiased variance over all
    the samples (and positions) of every batch together, not a momentum or an average of batch
    statistics. A group that never occurs keeps its statistics; ``num_batches_tracked`` counts
    the batches in which each group occurred. Everything else the pass could change (momentum
    updates, an estimated prior, the start of CN-X and CN-E, the parameters) is restored, and
    every module gets its ``training`` flag back.

    Args:
        model: the model; its context layers need a known context for every sample, as in
            training. A :class:`~contextnorm.ContextualModel` is called as ``model(x, context)``,
            any other model as ``model(x)`` inside :func:`~contextnorm.use_context`.
        batches: yields ``(x, context)``, or ``x`` for models without context layers (a data
            loader, for instance); tensors go to the model's device.
        progress: show a progress bar (tqdm's, when installed, on a terminal; otherwise a line
            on stderr every 10 seconds).

    Under DDP, call it on every process with its shard of the data, the same number of
    batches each: synchronised layers then re-estimate from every process's data.

    Raises:
        ValueError: ``model`` holds no layer with running statistics.
    """
    layers = [
        module
        for module in model.modules()
        if isinstance(module, (NormBase, nn.modules.batchnorm._BatchNorm))
        and getattr(module, "track_running_stats", False)
        and getattr(module, "running_mean", None) is not None
    ]
    if not layers:
        raise ValueError(
            f"recalibrate found no layer with running statistics in {type(model).__name__} "
            "(BatchNorm, ContextNorm, ModeNorm, SwitchNorm with track_running_stats=True)"
        )
    saved = {
        module: copy.deepcopy(module.state_dict())
        for module in model.modules()
        if isinstance(module, (NormBase, nn.modules.batchnorm._BatchNorm))
    }
    flags = {module: module.training for module in model.modules()}
    records = {layer: _Record() for layer in layers}
    hooks = []
    for layer, record in records.items():
        if isinstance(layer, NormBase):
            layer._statistics_record = record.add
        else:
            hooks.append(layer.register_forward_pre_hook(record.add_batchnorm_input))
    device = next((tensor.device for tensor in [*model.parameters(), *model.buffers()]), None)
    try:
        model.train()
        with torch.no_grad():
            for batch in _shown(batches, progress):
                _run(model, batch, device)
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            if isinstance(layer, NormBase):
                del layer._statistics_record
        for module, state in saved.items():
            module.load_state_dict(state)
        for module, training in flags.items():
            module.training = training
    for layer, record in records.items():
        record.write(layer)
    return model


def _run(model: nn.Module, batch: Any, device: torch.device | None) -> None:
    x, context = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
    if device is not None:
        x = x.to(device)
        context = context.to(device) if isinstance(context, Tensor) else context
    if isinstance(model, ContextualModel):
        model(x, context)
    elif isinstance(batch, (tuple, list)):
        with use_context(context):
            model(x)
    else:
        model(x)


class _Record:
    """A layer's batch sums over the whole pass, and each batch's count per group."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.counts: list[Tensor] = []

    def add(self, packed: Tensor) -> None:
        self.total = packed.clone() if self.total is None else self.total + packed
        self.counts.append(packed[:, 0])

    def add_batchnorm_input(self, layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        moments = F.sample_moments(x.reshape(x.shape[0], x.shape[1], -1))
        ones = moments.mean.new_ones(x.shape[0], 1)
        self.add(F.packed_sums(moments.mean, moments.var, moments.values.shape[2], weights=ones))

    def write(self, layer: nn.Module) -> None:
        """Set ``layer``'s running statistics of the groups that occurred (over every process)."""
        if self.total is None:
            return
        total, counts = self.total, torch.stack(self.counts)
        group = active_group(layer.process_group) if _synchronised(layer) else None
        if group is not None:
            # Every process ran the same batches: one step's batch is the union of theirs.
            reduced = torch.cat((total, counts.t()), dim=1)
            torch.distributed.all_reduce(reduced, group=group)
            total, counts = reduced[:, : total.shape[1]], reduced[:, total.shape[1] :].t()
        mean, var, count = F.packed_moments(total)
        correction = torch.where(count > 1, count / (count - 1).clamp_min(1.0), 1.0)
        unbiased = var * correction.unsqueeze(1)
        present = count > 0
        with torch.no_grad():
            running_mean = layer.running_mean.view(-1, layer.num_features)
            running_var = layer.running_var.view(-1, layer.num_features)
            running_mean.copy_(
                torch.where(present.unsqueeze(1), mean.to(running_mean), running_mean)
            )
            running_var.copy_(
                torch.where(present.unsqueeze(1), unbiased.to(running_var), running_var)
            )
            tracked = layer.num_batches_tracked
            if tracked.dim() == 1:
                # Per group (CN's contexts): the batches that held it.
                tracked.copy_(torch.where(present, (counts > 0).sum(0).to(tracked), tracked))
            else:
                tracked.fill_(int((counts.sum(1) > 0).sum()))


def _synchronised(layer: nn.Module) -> bool:
    return isinstance(layer, SyncBatchNorm) or bool(getattr(layer, "synchronized", False))


def _shown(batches: Iterable[Any], progress: bool) -> Iterable[Any]:
    """``batches``, with a progress display when asked."""
    if not progress:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _progress_lines(batches)
    # disable=None: no bar when the output is not a terminal.
    return tqdm(batches, desc="recalibrate", unit="batch", leave=False, disable=None)


def _progress_lines(batches: Iterable[Any]) -> Iterator[Any]:
    start = last = time.monotonic()
    for count, batch in enumerate(batches, 1):
        yield batch
        now = time.monotonic()
        if now - last >= _PROGRESS_EVERY_S:
            print(
                f"recalibrate: {count} batches ({now - start:.0f} s)", file=sys.stderr, flush=True
            )
            last = now
