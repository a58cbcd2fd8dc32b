"""The generic runner: every method of a config trained once per seed, then tables and figures.

It knows no task: the task (``contextnorm.tasks``) says what is trained and measured, and the
runner does the rest once for all of them.

* :mod:`~contextnorm.runner.experiment`: :func:`run_experiment`, :func:`prepare_experiment`.
* :mod:`~contextnorm.runner.run`: one (method, seed) run: fit, evaluate, record, reuse, resume.
* :mod:`~contextnorm.runner.trainer`, :mod:`~contextnorm.runner.callbacks`: Lightning's Trainer
  and the callbacks of exact resume, divergence and interrupts.
* :mod:`~contextnorm.runner.fingerprint`: a run's settings, derived from the config schema.
* :mod:`~contextnorm.runner.activations`: activations of a tested layer, for the figures.
* :mod:`~contextnorm.runner.diagnostics`: the mixture layers' usage per epoch and the norm
  layers' train/eval gap at the end of every run.
* :mod:`~contextnorm.runner.progress`: the live bar, or plain lines.
* :mod:`~contextnorm.runner.folder`, :mod:`~contextnorm.runner.report`,
  :mod:`~contextnorm.runner.plots`: the results folder, its tables and figures (these need
  neither torch nor Lightning).

The names below are loaded on first use, so that reading results does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_experiment": "contextnorm.runner.experiment",
    "prepare_experiment": "contextnorm.runner.experiment",
    "run_single": "contextnorm.runner.run",
    "Interrupted": "contextnorm.runner.run",
    "is_main_process": "contextnorm.runner.run",
    "write_report": "contextnorm.runner.report",
    "headline_table": "contextnorm.runner.report",
    "load_results": "contextnorm.runner.folder",
    "ExperimentResults": "contextnorm.runner.folder",
    "RunRecord": "contextnorm.runner.folder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
