"""What a user of normalization layers wants to see of them inside a model (torch only).

Two views, both keyed by the layer's qualified name in the model (``model.named_modules()``):

* :func:`mixture_diagnostics`: how a mixture layer (ACN, MixNorm) uses its components, read
  from buffers the layers update in every training step. Updating them costs no host
  synchronisation; reading them costs one, so read them when logging (once per epoch, or
  every few hundred steps), not in the training step.
* :func:`train_eval_gap`: how far each layer's eval-mode output is from what training mode
  computes on the same input, for every layer whose eval mode uses running estimates
  (BatchNorm, CN, ModeNorm, SwitchNorm, ACN, MixNorm). A large gap means that the network is
  evaluated on activations it was not trained on.

Example::

    from contextnorm.layers import diagnostics

    for name, d in diagnostics.mixture_diagnostics(model).items():
        print(name, d.weights.tolist(), float(d.used_components), float(d.posterior_entropy))
    gaps = diagnostics.train_eval_gap(model, images)      # {name: LayerGap}
    print(max(g.relative for g in gaps.values()))
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .base import NormBase
from .mixture import AdaptiveContextNorm, MixtureNorm

__all__ = [
    "LayerGap",
    "MixtureDiagnostics",
    "mixture_diagnostics",
    "running_estimate_layers",
    "train_eval_gap",
]


class MixtureDiagnostics(NamedTuple):
    """A mixture layer's use of its K components, averaged over recent training batches.

    All are tensors on the layer's device (no host synchronisation until read).

    Attributes:
        weights: (K,) share of the positions' posterior mass each component received
            (``running_prior``; the mixture weights in ACN's momentum mode).
        used_components: () ``exp`` of the entropy of ``weights``: the number of components
            in use, from 1 (one component takes every position) to K (equal shares).
        posterior_entropy: () mean entropy of one position's posterior, in nats: 0 when every
            position belongs to a single component, ``log K`` when none is preferred.
        components_per_position: () ``exp(posterior_entropy)``, from 1 to K.
        min_variance_ratio: () the smallest component variance over the mixture's total
            variance in the same channel: near 0 when a component has collapsed in some
            channel (positions it gets some weight on are then amplified).
    """

    weights: Tensor
    used_components: Tensor
    posterior_entropy: Tensor
    components_per_position: Tensor
    min_variance_ratio: Tensor


class LayerGap(NamedTuple):
    """One layer's train/eval gap on a batch (Python floats).

    Attributes:
        absolute: mean ``|y_train - y_eval|`` over the layer's output.
        relative: ``absolute`` over the mean ``|y_eval|``.
    """

    absolute: float
    relative: float


def _is_mixture(module: nn.Module) -> bool:
    return isinstance(module, (AdaptiveContextNorm, MixtureNorm)) and module.track_running_stats


def mixture_diagnostics(model: nn.Module) -> dict[str, MixtureDiagnostics]:
    """:class:`MixtureDiagnostics` of every ACN and MixNorm layer (with running estimates).

    Computed from the layers' buffers, which training mode updates in every step
    (``running_prior``, ``running_entropy``, ``running_mean``, ``running_var``); a layer that
    has not trained yet reports its initial state (equal weights, zero entropy).
    """
    report = {}
    for name, layer in model.named_modules():
        if not _is_mixture(layer):
            continue
        with torch.no_grad():
            weights = layer.running_prior.float()
            share = weights / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
            used = torch.exp(-(share * share.clamp_min(1e-30).log()).sum())
            mean, var = layer.running_mean.float(), layer.running_var.float()
            centre = share @ mean
            total = share @ (var + (mean - centre) ** 2)
            ratio = (var / total.clamp_min(torch.finfo(total.dtype).tiny)).min()
            entropy = layer.running_entropy.float()
        report[name] = MixtureDiagnostics(weights, used, entropy, entropy.exp(), ratio)
    return report


def running_estimate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The normalization layers of ``model`` whose eval mode uses running estimates.

    PyTorch's BatchNorm and InstanceNorm with ``track_running_stats``, and every contextnorm
    layer with ``track_running_stats`` (CN, ModeNorm, SwitchNorm, ACN, MixNorm); CN-X and CN-E
    compute the same function in both modes and are not included.
    """
    norm_types = (NormBase, nn.modules.batchnorm._NormBase)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, norm_types) and getattr(module, "track_running_stats", False)
    }


def train_eval_gap(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, LayerGap]:
    """The train/eval gap of every layer with running estimates, on one batch.

    ``model(*args, **kwargs)`` runs once in eval mode without gradients. At each layer of
    :func:`running_estimate_layers`, a copy of the layer in training mode normalises the same
    input (the one the layer receives in eval mode), so each number is the gap this layer adds,
    not the difference accumulated by the layers before it (which shows, though, in the input
    a deep layer receives). Context layers get the contexts the model gives them (an argument,
    or the :func:`contextnorm.use_context` scope this function is called in).

    Nothing changes: the copies' running-estimate updates are discarded, every module's
    ``training`` flag is restored, and random number generators (MixNorm's EM draws
    positions) are restored. Call it on a batch from the data the model is evaluated on;
    the batch size should be the training batch size, since the training-mode output of a
    layer depends on it.
    """
    layers = running_estimate_layers(model)
    # Copied before any hook is registered (a copy must not carry the hook that calls it), and
    # copied again at each call, so that a layer called twice starts from the same state twice.
    pristine = {name: copy.deepcopy(layer) for name, layer in layers.items()}
    gaps: dict[str, tuple[Tensor, Tensor]] = {}

    def measure(name: str):
        def hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict, output: Any) -> None:
            if not isinstance(output, Tensor):
                return
            with _forked_rng(output.device):
                trained = copy.deepcopy(pristine[name]).train()(*hook_args, **hook_kwargs)
            difference = (trained.float() - output.float()).abs().mean()
            gaps[name] = (difference, output.float().abs().mean())

        return hook

    modes = {module: module.training for module in model.modules()}
    handles = [
        layer.register_forward_hook(measure(name), with_kwargs=True)
        for name, layer in layers.items()
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    report = {}
    for name, (difference, scale) in gaps.items():
        absolute, size = float(difference), float(scale)
        report[name] = LayerGap(absolute, absolute / size if size > 0 else math.inf)
    return report


def _forked_rng(device: torch.device) -> Any:
    """Restore the CPU generator, and ``device``'s if it is an accelerator, after the block."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)
