"""Activations at a tested norm layer, recorded with forward hooks, for histograms and projections.

:func:`capture_activations` hooks the layer and lets the task run its module on held-out
samples (``Task.probe``), whatever the task's data; :class:`ActivationSample` is what is kept
(``activations.npz``). Reading a sample needs NumPy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contextnorm.config import PlotConfig
from contextnorm.io import atomic_write

if TYPE_CHECKING:
    from torch import nn

    from contextnorm.tasks import Probe, TaskModule

MAX_CHANNEL_VALUES = 50_000


@dataclass
class ActivationSample:
    """What one norm layer saw and produced on a sample of held-out inputs.

    Attributes:
        layer: the layer's class name.
        layer_index: which tested layer it is (``plots.layer``), counted from the input.
        channel: the channel whose input values are kept (``plots.channel``).
        samples: how many samples were asked for (``plots.samples``).
        channel_values: (M,) input values of that channel at every position of the samples
            (randomly thinned to at most ``MAX_CHANNEL_VALUES``).
        channel_contexts: (M,) the context id of the sample each value belongs to.
        features: (N, C) the layer's output averaged over positions: one vector per sample.
        contexts: (N,) the samples' context ids (-1: unknown).
        labels: (N,) the samples' labels (-1 where the task has none).
    """

    layer: str
    layer_index: int
    channel: int
    samples: int
    channel_values: np.ndarray
    channel_contexts: np.ndarray
    features: np.ndarray
    contexts: np.ndarray
    labels: np.ndarray

    def matches(self, plots: PlotConfig) -> bool:
        """Whether the sample was recorded with the figure settings of ``plots``."""
        return (self.layer_index, self.channel, self.samples) == (
            plots.layer,
            plots.channel,
            plots.samples,
        )

    def save(self, path: str | Path) -> Path:
        """Write the sample to an ``.npz`` file, atomically."""
        arrays = {item.name: np.asarray(getattr(self, item.name)) for item in fields(self)}

        def write(temporary: Path) -> None:
            with temporary.open("wb") as file:
                np.savez_compressed(file, **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> ActivationSample | None:
        """Read a sample written by :meth:`save`; ``None`` for a file of an older layout."""
        with np.load(path) as arrays:
            if any(item.name not in arrays for item in fields(cls)):
                return None
            values = {item.name: arrays[item.name] for item in fields(cls)}
        values["layer"] = str(values["layer"])
        for name in ("layer_index", "channel", "samples"):
            values[name] = int(values[name])
        return cls(**values)


def capture_activations(
    probe: Callable[[int, int], Probe],
    module: TaskModule,
    layer: nn.Module,
    *,
    plots: PlotConfig,
    seed: int,
) -> ActivationSample:
    """Record ``layer``'s input and output while ``probe`` runs ``module`` in eval mode.

    Args:
        probe: ``probe(count, seed)`` runs the module on ``count`` held-out samples chosen with
            ``seed`` (a task's ``probe`` for one method).
        module: the trained module.
        layer: a tested norm layer inside it.
        plots: which layer index, channel and number of samples.
        seed: seed of the sample choice and of the value thinning.

    Raises:
        RuntimeError: the layer did not run during the probe.
        ValueError: ``plots.channel`` is not a channel of the layer.
    """
    import torch

    recorded: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        recorded["input"] = inputs[0].detach()
        recorded["output"] = output.detach()

    was_training = module.training
    module.eval()
    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            probed = probe(plots.samples, seed)
    finally:
        handle.remove()
        module.train(was_training)
    if "input" not in recorded:
        raise RuntimeError(
            f"{type(layer).__name__} did not run in the forward pass; it is not part of the model"
        )
    inputs, outputs = recorded["input"].float().cpu(), recorded["output"].float().cpu()
    if not 0 <= plots.channel < inputs.shape[1]:
        raise ValueError(
            f"plots.channel={plots.channel} but the tested layer has {inputs.shape[1]} channels"
        )
    contexts = probed.contexts.cpu()
    values = inputs[:, plots.channel].reshape(len(inputs), -1)
    value_contexts = contexts[:, None].expand_as(values).reshape(-1).numpy()
    values = values.reshape(-1).numpy()
    if len(values) > MAX_CHANNEL_VALUES:
        kept = np.random.default_rng(seed).choice(len(values), MAX_CHANNEL_VALUES, replace=False)
        values, value_contexts = values[kept], value_contexts[kept]
    features = outputs.flatten(2).mean(2) if outputs.dim() > 2 else outputs
    return ActivationSample(
        layer=type(layer).__name__,
        layer_index=plots.layer,
        channel=plots.channel,
        samples=plots.samples,
        channel_values=values,
        channel_contexts=value_contexts,
        features=features.numpy(),
        contexts=contexts.numpy(),
        labels=probed.labels.cpu().numpy(),
    )
