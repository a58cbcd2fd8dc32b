"""The task interface: what an experiment trains and measures, and the :data:`TASKS` registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from contextnorm.config import ConfigError, ExperimentConfig, parse_section
from contextnorm.metrics import ReportSpec
from contextnorm.registry import Registry

if TYPE_CHECKING:
    import lightning as L
    import torch

    from contextnorm.tasks.module import TaskModule


@dataclass(frozen=True)
class Selection:
    """The epoch metric that selects and stops: early stopping watches it, results report its
    best epoch, and the progress display shows it.

    Attributes:
        metric: a key the module logs once per epoch (``val/loss``, ``val/fid``).
        mode: ``"min"`` when lower is better, ``"max"`` when higher is.
    """

    metric: str
    mode: Literal["min", "max"]


@dataclass(frozen=True)
class Probe:
    """What :meth:`Task.probe` ran through the model: the samples' contexts and labels.

    Attributes:
        contexts: int64 (N,) the group the figures draw each sample in, named by
            ``ReportSpec.context_names``: the context id it was run with (-1: unknown), unless
            the task names other groups (domain adaptation: the sample's domain, whatever
            contexts an ablation ran with).
        labels: int64 (N,) the samples' labels (-1 where the task has none).
    """

    contexts: torch.Tensor
    labels: torch.Tensor


@dataclass
class NoOptions:
    """A task without options of its own: ``task.options`` must be empty."""


class Task(ABC):
    """What an experiment trains and measures. The runner knows nothing else about it.

    A task owns its data and batch layout, its model(s), losses, optimizers and metrics, the
    metric that selects and stops (:attr:`selection`), and what the report shows
    (:meth:`describe`). The runner owns everything written once for all tasks: the loop over
    methods and seeds, seeding, Lightning's Trainer (a checkpoint every epoch, exact resume,
    early stopping on :attr:`selection`, the progress display, loggers), divergence and
    interrupt handling, the results folder, the activation figures and the report.

    Registering a task::

        @TASKS.register("my-task")
        class MyTask(Task):
            '''One line for `contextnorm list`.'''

            @dataclass
            class Options:        # task.options in a config, checked like every other key
                noise: float = 0.1

            selection = Selection("val/loss", "min")
            ...

    and ``task: {name: my-task, options: {noise: 0.2}}`` in a config (with ``imports:
    [my_module]`` when the task lives outside this package).

    The runner calls, in this order:

    1. ``Task(config)``: reads ``config.task.options`` into :attr:`options`. No data is loaded.
    2. :meth:`setup`, once per experiment, before any training: load the data, build the
       contexts, and check everything that can be checked without training, raising
       ``ConfigError`` that names the config key to change. The runner then builds every
       method's module once (:meth:`build_module`), so that a bad method option, model size or
       figure setting fails here too.
    3. :meth:`describe` and :meth:`info`: what the report shows and the facts about the data;
       both are stored in the results folder, and the report is drawn from them alone.
    4. For each run of ``config.methods[index]`` with a seed, every random generator seeded
       from the seed (each call gets the method's ``index``):

       a. :meth:`build_module`: a :class:`~contextnorm.tasks.module.TaskModule` (a
          LightningModule) for the method: its model(s) with the method's norm, its training
          and validation steps, losses, ``configure_optimizers`` (several optimizers with
          manual optimization, for a GAN) and metrics, and the norm layers under test in
          ``tested_layers``. Every value it logs once per epoch (``on_epoch=True``) joins the
          run's history, drawn as curves; a non-finite one, or a ``FloatingPointError`` raised
          in a step, marks the run diverged at that epoch, and the experiment goes on.
       b. :meth:`datamodule`: the data module whose batches the module's steps read.
       c. The runner fits (``Trainer.fit``), resuming from the run's checkpoint if it has one,
          with the task's :meth:`callbacks` before its own (which log, every epoch, how the
          mixture layers of any network in the module use their components).
       d. :meth:`evaluate`: tests the trained module; returns ``{view: {metric: value}}`` with
          the views and metric keys of :meth:`describe`.
       e. :meth:`held_out_batch`: the batch the norm layers' train/eval gap is measured on.
       f. :meth:`probe`, for the first seed when figures are on: runs the module on held-out
          samples while the runner records a tested layer's input and output.
       g. :meth:`save_artifacts`: extra files of the run (e.g. generated images), if any.

    Under several devices (DDP), the steps run on every process, the norm layers compute their
    batch statistics over all processes, and metrics are reduced over processes (torchmetrics
    objects; values logged with ``sync_dist=True``); the runner writes every file from the main
    process, and calls :meth:`save_artifacts` there only. ``train.batch_size`` is the batch of a
    whole step: build loaders with :func:`~contextnorm.tasks.data.split_loader` (or
    :func:`~contextnorm.tasks.data.data_loader` for another data set), which gives each
    process its share and evaluates every sample once (evaluation shards may then differ in
    size: log evaluation values as torchmetrics objects, e.g. a loss as ``MeanMetric``, which
    reduce exactly, rather than with ``sync_dist``, which averages the processes' means).

    Building blocks a task may use: :mod:`contextnorm.tasks.data` (the configured splits,
    contexts fitted and checked, loaders of (image, label, context) batches),
    :func:`~contextnorm.tasks.network.build_network` and
    :func:`~contextnorm.tasks.network.norm_factory` (a method's norm in a registered model or
    in a task's own network), :func:`~contextnorm.tasks.module.build_optimizer` and
    :func:`~contextnorm.tasks.module.build_scheduler` (``train:``'s optimiser and schedule;
    a GAN's module sets ``automatic_optimization = False`` and builds one per network, e.g.
    with ``betas=(0.5, 0.999)``), :class:`~contextnorm.tasks.preprocess.BatchPreprocess`
    (kornia augmentation on the device). A method may carry contexts of its own
    (``config.methods[index].contexts``, ``None`` for the experiment's). Per-run images a
    task writes in :meth:`save_artifacts` and names in ``ReportSpec.run_images`` appear in the
    report; per-epoch values (an FID, a gradient variance) become curves when
    ``ReportSpec.curves`` (or a figure of ``ReportSpec.curve_figures``) names them.

    Attributes:
        config: the experiment's config.
        options: ``config.task.options`` read into :attr:`Options`.
    """

    Options: ClassVar[type] = NoOptions
    """The dataclass of ``task.options``; its type hints say what each key holds."""

    selection: ClassVar[Selection]
    """The epoch metric that selects and stops, and whether lower or higher is better."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.options = parse_section(self.Options, config.task.options, "task.options")

    @abstractmethod
    def setup(self) -> None:
        """Load the data and check the config against it, before any training.

        Raises:
            ConfigError: a setting that does not fit the data, naming the key to change.
            FileNotFoundError: the data are missing (the message says where to get them).
        """

    @abstractmethod
    def describe(self) -> ReportSpec:
        """What the results tables and figures show: metrics, test views, curves, description."""

    def info(self) -> dict[str, Any]:
        """Facts about the prepared data for ``experiment.json`` (JSON-serialisable)."""
        return {}

    @abstractmethod
    def build_module(self, index: int) -> TaskModule:
        """The module of ``config.methods[index]``, initialised from the current random state."""

    @abstractmethod
    def datamodule(self, index: int, module: TaskModule) -> L.LightningDataModule:
        """The data for the training, validation and test steps of method ``index``'s module."""

    @abstractmethod
    def evaluate(
        self,
        index: int,
        trainer: L.Trainer,
        module: TaskModule,
        datamodule: L.LightningDataModule,
    ) -> dict[str, dict[str, float]]:
        """Test the trained ``module``: view -> metric -> value, for every view described."""

    def probe(self, index: int, module: TaskModule, count: int, seed: int) -> Probe:
        """Run ``module`` (in eval mode) on ``count`` held-out samples chosen with ``seed``.

        The runner records the input and output of a tested layer during this call, for the
        activation histograms and feature projections.
        """
        raise NotImplementedError(f"{type(self).__name__} does not record activations")

    def held_out_batch(
        self, index: int, module: TaskModule, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One batch of held-out inputs, chosen with ``seed``, as ``module(inputs, contexts)``
        takes them (on the module's device): the inputs the runner measures the norm layers'
        train/eval gap on (:func:`contextnorm.layers.diagnostics.train_eval_gap`).

        Held-out means validation samples, else test samples (a generator's fresh latents);
        the batch holds as many samples as the norm layers normalise together in a training
        step, since their training-mode output depends on it. ``None`` (the default): the task
        has no such batch, and no gap is measured.
        """
        return None

    def callbacks(self, index: int) -> list[L.Callback]:
        """Lightning callbacks of a run of method ``index`` besides the runner's (none by
        default), e.g. a measurement that logs per-epoch values in ``on_train_epoch_end``.

        They run before the runner's own callbacks, so what they log joins the epoch's record
        (and the curves); their state is saved in the run's checkpoint.
        """
        return []

    def save_artifacts(self, index: int, module: TaskModule, run_dir: Path) -> None:  # noqa: B027
        """Write extra files of a finished run into ``run_dir`` (nothing by default).

        Image files named in ``describe().run_images`` are shown by the report.
        """


TASKS: Registry[type[Task]] = Registry("task")
"""Tasks by name (``task.name`` in a config)."""


def build_task(config: ExperimentConfig) -> Task:
    """The task of ``config``, with its options read and checked.

    Raises:
        ConfigError: an unknown task or a bad ``task.options`` entry.
    """
    try:
        task_class = TASKS.get(config.task.name)
    except KeyError as error:
        raise ConfigError(f"task.name: {error}") from None
    return task_class(config)
