"""Tasks: what an experiment trains and measures (classification, domain adaptation, ...).

* :class:`Task`: the interface the runner calls; its docstring is the contract.
* :data:`TASKS`: the registry (``task.name`` in a config; ``contextnorm list`` shows it).
* :class:`TaskModule`: the base of each task's LightningModule (contexts, tested layers,
  the optimiser of ``train:``).
* Building blocks every task may use: :mod:`contextnorm.tasks.data` (splits, contexts,
  loaders), :mod:`contextnorm.tasks.network` (a method's norm in a registered model),
  :mod:`contextnorm.tasks.preprocess` (uint8 batches to normalised, augmented floats).

The tasks shipped with the package are imported below, which registers them.
"""

from contextnorm.tasks.base import TASKS, NoOptions, Probe, Selection, Task, build_task
from contextnorm.tasks.module import NOT_GIVEN, TaskModule, run_with_contexts

# Importing a task's module registers it.
from contextnorm.tasks import classification, generation  # noqa: E402, F401  (isort: skip)

__all__ = [
    "NOT_GIVEN",
    "TASKS",
    "NoOptions",
    "Probe",
    "Selection",
    "Task",
    "TaskModule",
    "build_task",
    "run_with_contexts",
]
