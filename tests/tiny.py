"""The experiments the runner tests train: digits, a narrow Shallow CNN (or a WRN-10-1 for
domain adaptation), one epoch."""

from __future__ import annotations

from pathlib import Path

from contextnorm.config import ExperimentConfig, apply_overrides, parse_config


def tiny_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """A config writing into ``tmp_path / "results"``; ``overrides`` as on the command line."""
    base = [
        "name=tiny",
        f"output_dir={tmp_path / 'results'}",
        "data.name=digits",
        "contexts.kind=domain",
        "model.name=shallow_cnn",
        "model.options.widths=[4, 8, 8, 8]",
        "methods=[bn, cn]",
        "train.epochs=1",
        "train.batch_size=64",
        "train.seeds=[0]",
        "train.schedule=constant",
        "train.progress=none",
        "train.cpu_threads=1",
        "train.accelerator=cpu",
        "plots.enabled=false",
    ]
    return parse_config(apply_overrides({}, [*base, *overrides]))


def tiny_adaptation_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """Domain adaptation on the embedded digits, original -> inverted (subsets), a WRN-10-1 at
    8x8, 8 source and 16 target images per step: 10 steps per epoch."""
    base = [
        "name=tiny-adaptation",
        f"output_dir={tmp_path / 'results'}",
        "task.name=adaptation",
        "task.options.target={name: digits, train_samples: 200, test_samples: 100,"
        " options: {domain: inverted}}",
        "task.options.uratio=2",
        "data.name=digits",
        "data.train_samples=96",
        "data.test_samples=100",
        "data.options={domain: original}",
        "model.name=wide_resnet",
        "model.placement=all",
        "model.options={depth: 10, widen_factor: 1}",
        "methods=[bn, cn]",
        "train.epochs=1",
        "train.batch_size=8",
        "train.eval_batch_size=256",
        "train.optimizer=adam",
        "train.lr=0.003",
        "train.weight_decay=5e-4",
        "train.schedule=cosine",
        "train.seeds=[0]",
        "train.progress=none",
        "train.cpu_threads=1",
        "train.accelerator=cpu",
        "plots.enabled=false",
    ]
    return parse_config(apply_overrides({}, [*base, *overrides]))
