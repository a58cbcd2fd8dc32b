"""The experiment the runner tests train: digits, a narrow Shallow CNN, one epoch, a second."""

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
