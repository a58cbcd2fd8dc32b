"""Experiments: every method of a config trained once per seed, with tables and figures.

* :func:`run_experiment`: run (or resume) an experiment; returns the results folder.
* :func:`prepare_experiment`: load data, build and check contexts and models, without training.
* :func:`write_report` / :func:`load_results`: tables and figures from a results folder.
"""

from contextnorm.experiments.prepare import PreparedExperiment, check_contexts, prepare_experiment
from contextnorm.experiments.report import (
    ExperimentResults,
    headline_table,
    load_results,
    write_report,
)
from contextnorm.experiments.runner import run_experiment, run_fingerprints, run_single

__all__ = [
    "ExperimentResults",
    "PreparedExperiment",
    "check_contexts",
    "headline_table",
    "load_results",
    "prepare_experiment",
    "run_experiment",
    "run_fingerprints",
    "run_single",
    "write_report",
]
