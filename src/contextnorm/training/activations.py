"""Activations at a norm layer, recorded with forward hooks, for the histograms and projections."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contextnorm.io import atomic_write
from contextnorm.training.data import ContextSplit
from contextnorm.training.module import ContextModule

MAX_CHANNEL_VALUES = 50_000


@dataclass
class ActivationSample:
    """What one norm layer saw and produced on a sample of test images.

    Attributes:
        layer: the layer's class name.
        channel: the channel whose input values are kept.
        channel_values: (M,) input values of that channel at every position of the images
            (randomly thinned to at most ``MAX_CHANNEL_VALUES``).
        features: (N, C) the layer's output averaged over positions: one vector per image.
        contexts: (N,) the images' context ids.
        labels: (N,) the images' labels.
    """

    layer: str
    channel: int
    channel_values: np.ndarray
    features: np.ndarray
    contexts: np.ndarray
    labels: np.ndarray

    def save(self, path: str | Path) -> Path:
        """Write the sample to an ``.npz`` file, atomically."""
        arrays = {item.name: np.asarray(getattr(self, item.name)) for item in fields(self)}

        def write(temporary: Path) -> None:
            with temporary.open("wb") as file:
                np.savez_compressed(file, **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> ActivationSample:
        """Read a sample written by :meth:`save`."""
        with np.load(path) as arrays:
            values = {item.name: arrays[item.name] for item in fields(cls)}
        values["layer"] = str(values["layer"])
        values["channel"] = int(values["channel"])
        return cls(**values)


@torch.no_grad()
def capture_activations(
    module: ContextModule,
    layer: nn.Module,
    split: ContextSplit,
    *,
    samples: int,
    channel: int,
    seed: int,
) -> ActivationSample:
    """Run ``samples`` random images of ``split`` through ``module`` (eval mode); record ``layer``.

    Args:
        module: the trained module (its preprocessing and context routing are used).
        layer: a norm layer inside the module's model.
        split: images, labels and the contexts to run them with.
        samples: how many images to use (all if the split is smaller).
        channel: the channel whose input values are kept.
        seed: seed of the image and value subsampling.
    """
    generator = np.random.default_rng(seed)
    chosen = torch.from_numpy(np.sort(generator.permutation(len(split.data))[:samples]))
    recorded: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        recorded["input"] = inputs[0].detach()
        recorded["output"] = output.detach()

    was_training = module.training
    module.eval()
    handle = layer.register_forward_hook(hook)
    try:
        images = module.preprocess(split.data.images[chosen].to(module.device), augment=False)
        module(images, split.contexts[chosen].to(module.device))
    finally:
        handle.remove()
        module.train(was_training)
    if "input" not in recorded:
        raise RuntimeError(
            f"{type(layer).__name__} did not run in the forward pass; it is not part of the model"
        )
    inputs, outputs = recorded["input"].float().cpu(), recorded["output"].float().cpu()
    if not 0 <= channel < inputs.shape[1]:
        raise ValueError(
            f"plots.channel={channel} but the tested layer has {inputs.shape[1]} channels"
        )
    values = inputs[:, channel].reshape(-1).numpy()
    if len(values) > MAX_CHANNEL_VALUES:
        values = generator.choice(values, MAX_CHANNEL_VALUES, replace=False)
    features = outputs.flatten(2).mean(2) if outputs.dim() > 2 else outputs
    return ActivationSample(
        layer=type(layer).__name__,
        channel=channel,
        channel_values=values,
        features=features.numpy(),
        contexts=split.contexts[chosen].numpy(),
        labels=split.data.labels[chosen].numpy(),
    )
