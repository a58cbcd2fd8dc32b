"""What every run records about its norm layers, whatever the task: how the mixture layers (ACN,
MixNorm) use their components over training, and each layer's train/eval gap at the end.

* :class:`MixtureUsage` logs once per epoch, per mixture layer, the components in use and the
  posterior entropy, and over the layers their median and minimum (and the smallest variance
  ratio): ``2 L + 5`` values per epoch for L mixture layers (83 for DenseNet-40 with every
  norm replaced), none for a model without mixture layers. They join the run's per-epoch
  records. The layers' full weight vectors are kept once, at the end (:func:`final_mixtures`).
* :func:`measure_train_eval_gap` runs
  :func:`~contextnorm.layers.diagnostics.train_eval_gap` on the task's held-out batch
  (:meth:`~contextnorm.tasks.Task.held_out_batch`) and summarises it over the layers.

Both are read from the layers' buffers or one forward pass: one host synchronisation each,
never one per training step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from contextnorm.layers.diagnostics import mixture_diagnostics, train_eval_gap
from contextnorm.metrics import (
    MIXTURE_COMPONENTS,
    MIXTURE_ENTROPY,
    MIXTURE_VARIANCE_RATIO,
    mixture_layer_key,
    mixture_summary_key,
)
from contextnorm.tasks import Task, TaskModule


class MixtureUsage(L.Callback):
    """Logs, at the end of every training epoch, how each mixture layer uses its K components.

    Per layer (qualified name in the module): ``mixture/<layer>/components``, the components in
    use (``exp`` of the entropy of the mixture weights, 1 to K) and ``mixture/<layer>/entropy``,
    the mean posterior entropy of a position in nats (0 to log K). Over the layers: the median
    and minimum of both, and the minimum of each layer's smallest component variance over its
    mixture's variance (``mixture/min_variance_ratio/min``: near 0 when a component collapsed).

    The values are the layers' running averages over recent training batches
    (:func:`~contextnorm.layers.diagnostics.mixture_diagnostics`), read with one host
    synchronisation per epoch. Under several processes they are process 0's.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        found = mixture_diagnostics(pl_module)
        if not found:
            return
        table = torch.stack(
            [
                torch.stack([d.used_components, d.posterior_entropy, d.min_variance_ratio])
                for d in found.values()
            ]
        ).tolist()
        values: dict[str, float] = {}
        for name, (components, entropy, _) in zip(found, table, strict=True):
            values[mixture_layer_key(name, MIXTURE_COMPONENTS)] = components
            values[mixture_layer_key(name, MIXTURE_ENTROPY)] = entropy
        for column, quantity in enumerate((MIXTURE_COMPONENTS, MIXTURE_ENTROPY)):
            per_layer = [row[column] for row in table]
            values[mixture_summary_key(quantity, "median")] = statistics.median(per_layer)
            values[mixture_summary_key(quantity, "min")] = min(per_layer)
        values[mixture_summary_key(MIXTURE_VARIANCE_RATIO, "min")] = min(row[2] for row in table)
        for key, value in values.items():
            pl_module.log(key, value, on_epoch=True)


def final_mixtures(module: TaskModule) -> list[dict[str, Any]] | None:
    """Each mixture layer's name, weights and usage at the end of training, in forward order
    (a list: ``result.json`` sorts the keys of mappings), for ``result.json``; ``None``
    without mixture layers."""
    found = mixture_diagnostics(module)
    if not found:
        return None
    return [
        {
            "layer": name,
            "weights": d.weights.tolist(),
            "used_components": float(d.used_components),
            "posterior_entropy": float(d.posterior_entropy),
            "min_variance_ratio": float(d.min_variance_ratio),
        }
        for name, d in found.items()
    ]


def measure_train_eval_gap(
    task: Task, index: int, module: TaskModule, seed: int
) -> dict[str, Any] | None:
    """The train/eval gap of every layer with running estimates on the task's held-out batch.

    Returns ``None`` when the task has no held-out batch or no layer of the module ran with
    running estimates; else ``{"layers": {name: {"absolute", "relative"}}, "median": ...,
    "max": ..., "samples": N}``: the median and maximum of the layers' relative gaps (mean
    ``|y_train - y_eval|`` over mean ``|y_eval|``), on ``N`` inputs. Random draws inside the
    layers (MixNorm's EM) come from ``seed``; the global random state is left as it was.
    """
    batch = task.held_out_batch(index, module, seed)
    if batch is None:
        return None
    devices = [module.device] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gaps = train_eval_gap(module, *batch)
    if not gaps:
        return None
    relative = [gap.relative for gap in gaps.values()]
    return {
        "layers": {name: gap._asdict() for name, gap in gaps.items()},
        "median": statistics.median(relative),
        "max": max(relative),
        "samples": len(batch[0]),
    }


def measure_saved_runs(results_dir: Path, echo: Callable[[str], None] = print) -> int:
    """Measure the layer diagnostics of finished runs that have none, from their checkpoints.

    Runs finished before the train/eval gap and the final mixtures were recorded get them now:
    each run's module is rebuilt from the folder's config, its last checkpoint loaded, and
    :func:`final_mixtures` and :func:`measure_train_eval_gap` measured as at the end of
    training. Runs whose checkpoint is gone are left as they are. The per-epoch mixture usage
    cannot be recovered. Returns how many runs were measured.
    """
    from contextnorm.runner.experiment import prepare_experiment
    from contextnorm.runner.folder import RESULT_FILE, RunRecord, read_config, run_directory
    from contextnorm.runner.trainer import last_checkpoint

    config = read_config(results_dir)
    pending = []
    for index, method in enumerate(config.methods):
        for seed in config.train.seeds:
            run_dir = run_directory(results_dir, method.display_name, seed)
            if not (run_dir / RESULT_FILE).is_file() or not last_checkpoint(run_dir).is_file():
                continue
            record = RunRecord.load(run_dir / RESULT_FILE)
            if record.finished and record.train_eval_gap is None:
                pending.append((index, seed, run_dir, record))
    if not pending:
        return 0
    task = prepare_experiment(config)
    for index, seed, run_dir, record in pending:
        module = task.build_module(index)
        checkpoint = torch.load(last_checkpoint(run_dir), map_location="cpu", weights_only=False)
        module.load_state_dict(checkpoint["state_dict"])
        record.mixture = final_mixtures(module)
        record.train_eval_gap = measure_train_eval_gap(task, index, module, seed)
        record.save(run_dir)
        echo(f"measured {config.methods[index].display_name} seed {seed}")
    return len(pending)
