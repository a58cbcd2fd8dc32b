"""Figures of a generation experiment: score curves per method, sample grids.

The generator's activation histograms with the fitted mixture components are drawn by
:func:`contextnorm.plots.plot_activation_histograms` from the samples of
:func:`contextnorm.tasks.gan.capture_generator_activations`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from contextnorm.plots import EpochRecord, _figure, _per_epoch, _save
from contextnorm.tasks.gan import grid_columns

SCORE_PANELS = (("fid", "FID"), ("kid", "KID"))
_TITLE_WIDTH = 48
_GRID_GAP = 2


def plot_score_curves(
    histories: Mapping[str, Sequence[Sequence[EpochRecord]]],
    titles: Mapping[str, str],
    path: str | Path,
) -> Path:
    """FID and KID against the epoch, one line per method, a band for the spread over seeds.

    Args:
        histories: method -> one score history per seed (records with ``epoch``, 0-based, and
            ``fid``, ``kid``: :attr:`GANModule.score_history`).
        titles: ``"fid"``/``"kid"`` -> the panel title, which names the features
            (:meth:`GenerationScores.title`: "FID, local MNIST classifier features; not
            comparable with Inception FID").
        path: the PNG file to write.

    Lines are the mean over seeds, bands the mean ± one sample standard deviation, clipped at
    zero (neither score is negative in expectation); the legend gives each method's number of
    seeds n. A score that is NaN (a diverged run) leaves that seed out of the epoch's mean.
    """
    figure, axes = _figure(len(SCORE_PANELS), columns=2)
    for (key, name), axis in zip(SCORE_PANELS, axes, strict=True):
        for method, runs in histories.items():
            epochs, summaries = _per_epoch(runs, key)
            if not epochs:
                continue
            mean = np.array([summary.mean for summary in summaries])
            spread = np.nan_to_num(np.array([summary.std for summary in summaries]))
            (line,) = axis.plot(
                epochs, mean, marker="o", markersize=3, label=f"{method} (n={len(runs)})"
            )
            axis.fill_between(
                epochs,
                np.clip(mean - spread, 0.0, None),
                mean + spread,
                color=line.get_color(),
                alpha=0.2,
            )
        axis.set_title(textwrap.fill(titles.get(key, name), _TITLE_WIDTH), fontsize="medium")
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"{name} (lower is better)")
        axis.set_ylim(bottom=0.0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small", title="mean ± std over seeds", title_fontsize="small")
    return _save(figure, path)


def tile_images(images: torch.Tensor, columns: int) -> np.ndarray:
    """uint8 images (N, C, H, W) as one (rows*H, columns*W[, C]) array, white gaps between."""
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty uint8 tensor (N, C, H, W); got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    count, channels, height, width = images.shape
    rows = -(-count // columns)
    step_y, step_x = height + _GRID_GAP, width + _GRID_GAP
    canvas = np.full(
        (rows * step_y - _GRID_GAP, columns * step_x - _GRID_GAP, channels), 255, np.uint8
    )
    pixels = images.permute(0, 2, 3, 1).numpy()
    for index in range(count):
        row, column = divmod(index, columns)
        canvas[row * step_y : row * step_y + height, column * step_x : column * step_x + width] = (
            pixels[index]
        )
    return canvas[..., 0] if channels == 1 else canvas


def plot_sample_grids(
    grids: Mapping[str, torch.Tensor], path: str | Path, *, subtitle: str | None = None
) -> Path:
    """One panel per method with its fixed-latent sample grid (:meth:`GANModule.grid_images`).

    Args:
        grids: method -> uint8 images (N, C, H, W), drawn row by row in a square-ish grid (row
            r was generated for context r mod K when the generator uses contexts).
        path: the PNG file to write.
        subtitle: a line under each method's name (e.g. the epoch and seed).
    """
    figure, axes = _figure(len(grids))
    for (method, images), axis in zip(grids.items(), axes, strict=True):
        tiled = tile_images(images, grid_columns(len(images)))
        axis.imshow(tiled, cmap="gray" if tiled.ndim == 2 else None, vmin=0, vmax=255)
        axis.set_title(method if subtitle is None else f"{method}\n{subtitle}", fontsize="medium")
        axis.set_xticks([])
        axis.set_yticks([])
    return _save(figure, path)
