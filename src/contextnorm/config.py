"""Experiment configuration: a typed schema, YAML files and ``key.sub=value`` overrides.

A config is read from YAML into the dataclasses below. Every key is checked: an unknown key
raises an error naming it and the valid keys at that level, a value of the wrong type names the
key and the expected type, and out-of-range values name the accepted range. Overrides from the
command line (``train.epochs=5``, ``methods=[bn,cn]``) are applied to the raw mapping before it
is checked, so they are held to the same rules as the file. Numbers may be written in
scientific notation everywhere (``lr: 1e-3``), in files and in overrides alike.

Only the checks that need no data happen here; the experiment checks contexts, data sets and
models against the loaded data before any training starts.

Each field's ``metadata`` says what the setting means for a run already trained (see
:data:`ROLE`); the runner derives a run's settings, and the difference between two runs'
settings, from it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "multistep", "cosine")
AUGMENTATIONS = ("auto", "none", "crop_flip")
PROGRESS_MODES = ("auto", "bar", "epoch", "run", "none")

ROLE = "role"
"""Field metadata key: what a setting means for a run already trained. A field without a role
changes what a run computes, so a checkpoint or result made under another value is not reused."""
EXECUTION = "execution"
"""Role of settings that change how a run executes or is shown, never what it computes."""
CONTINUATION = "continuation"
"""Role of settings under which a checkpoint can be continued; a finished result is not reused."""
CONTINUABLE_IF = "continuable_if"
"""Metadata beside ``CONTINUATION``: a test on the field's section for when it holds."""
OPTIONAL = "optional"
"""Role of settings whose default computes what runs computed before the setting existed: left
out of a run's settings at that default, so that adding one keeps the results already made."""


def _execution(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    return field(default=default, metadata={ROLE: EXECUTION}, **kwargs)


REUSE_POLICIES = ("settings", "code")
"""What a saved run must match to be reused: its settings, or its settings and code version."""


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and the fix."""


@dataclass
class TaskConfig:
    """What is trained and measured (``contextnorm list`` shows the registered tasks).

    Attributes:
        name: a registered task. A config without a ``task`` section is ``classification``.
        options: the task's own settings, checked against the task's ``Options`` schema
            before any data is loaded.
    """

    name: str = "classification"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which data set to load and how to split it.

    Attributes:
        name: a registered data set (``contextnorm list``).
        root: data directory; ``None`` uses ``$CONTEXTNORM_DATA/<name>`` or
            ``~/.cache/contextnorm/data/<name>``. For ``image-folder`` it is the folder
            holding ``train/`` and ``test/``.
        image_size: resize images to this side length; ``None`` keeps the stored size.
        download: fetch missing files from the official sources where the loader can.
        val_fraction: share of the training split held out (stratified) for the per-epoch
            validation curves and early stopping. ``0`` validates on the test split, the papers'
            protocol (then early stopping sees the test set).
        train_samples: keep a stratified random subset of this many training images (reduced
            runs); ``None`` keeps all.
        test_samples: the same for the test split.
        seed: seed of the subsets and of the validation split.
        augment: ``crop_flip`` (random crop with 4-pixel padding + horizontal flip), ``none``, or
            ``auto``: ``crop_flip`` for colour images, ``none`` for grayscale (digits, where a
            flip changes the class).
        options: options of the data set's loader, e.g. ``{domains: domains.csv}`` for
            ``image-folder`` (each image's domain from a CSV file).
    """

    name: str = "digits"
    root: str | None = None
    image_size: int | None = None
    download: bool = _execution(False)
    val_fraction: float = 0.1
    train_samples: int | None = None
    test_samples: int | None = None
    seed: int = 0
    augment: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, key: str = "data") -> None:
        """Check the values; messages name them under ``key`` (``data``, or a task's second
        data set such as ``task.options.target``)."""
        _require(
            0.0 <= self.val_fraction < 1.0,
            f"{key}.val_fraction",
            "must be in [0, 1)",
            self.val_fraction,
        )
        for name in ("image_size", "train_samples", "test_samples"):
            value = getattr(self, name)
            _require(
                value is None or value >= 1,
                f"{key}.{name}",
                "must be a positive integer or null",
                value,
            )
        _require_choice(f"{key}.augment", self.augment, AUGMENTATIONS)


@dataclass
class ContextConfig:
    """How each sample's context is built (``contextnorm.contexts.build_contexts``).

    Attributes:
        kind: a registered context kind (``contextnorm list``): ``kmeans``, ``gmm`` (EM
            components), ``superclass``, ``domain``, or ``random`` (the ablation: random
            contexts with the group sizes of another kind).
        num_contexts: K, the number of contexts; context layers are built with the same K.
            ``None`` takes K from the data (the number of domains or superclasses); clusterings
            need it set.
        seed: seed of the clustering (or of the random draw), shared by every method and seed
            of the experiment so that all of them see the same contexts.
        options: extra keyword arguments for the context builder.
    """

    kind: str = "domain"
    num_contexts: int | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        _require(
            self.num_contexts is None or self.num_contexts >= 1,
            "contexts.num_contexts",
            "must be a positive integer or null",
            self.num_contexts,
        )


@dataclass
class ModelConfig:
    """The network (``contextnorm.models.build_model``).

    Attributes:
        name: a registered model (``contextnorm list``).
        placement: where the tested norm goes: ``all``, ``index:I``, ``input`` or ``patch``.
        base_norm: method name of the norm at the sites that do not get the tested one
            (``None``: the architecture's own, BatchNorm).
        options: size arguments of the model (e.g. ``widths`` of the Shallow CNN).
    """

    name: str = "shallow_cnn"
    placement: str = "all"
    base_norm: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """One normalization method compared in the experiment.

    In YAML a method is a registry name (``cn``) or a mapping
    ``{name: cn, label: cn-no-prior, options: {prior_scaling: false}}``.

    Attributes:
        name: a registered method (``contextnorm list``).
        label: the row name in tables and plots; defaults to ``name``. Labels must be unique.
        options: keyword arguments for the layer (checked against its signature).
        contexts: contexts of this method's own, in place of the experiment's: the context
            ablations sit in the same tables, e.g. ``{kind: random}`` (the experiment's K and
            group sizes, drawn at random) or ``{kind: random, num_contexts: 1}`` (one context).
    """

    name: str
    label: str | None = _execution(None)
    options: dict[str, Any] = field(default_factory=dict)
    contexts: ContextConfig | None = None

    @property
    def display_name(self) -> str:
        """The label shown in results (``label``, or ``name`` when no label is set)."""
        return self.label or self.name


def _schedule_ignores_epochs(train: TrainConfig) -> bool:
    # Cosine and multistep schedules are laid out over the epoch count: another count changes
    # the learning rate of every epoch already trained.
    return train.schedule == "constant"


@dataclass
class TrainConfig:
    """Optimisation and run settings.

    Attributes:
        epochs: training epochs per run. With a constant learning rate, raising it continues
            finished runs from their last epoch.
        batch_size: training batch size (evaluation uses ``eval_batch_size`` or this); the
            whole batch of one step, split evenly over the processes of a multi-device run,
            so that the number of devices does not change what is trained.
        eval_batch_size: batch size for validation and test; ``None`` uses ``batch_size``.
        optimizer: ``adamw``, ``adam``, or ``sgd`` (with Nesterov momentum).
        lr: initial learning rate.
        weight_decay: weight decay of the optimizer.
        momentum: momentum of ``sgd``.
        gradient_clip: clip the L2 norm of all gradients together to this value before each
            optimiser step (Lightning's ``gradient_clip_val`` with the ``norm`` algorithm);
            ``None`` does not clip. A guard against gradient spikes for norms whose statistics
            do not follow the activations (CN-X, CN-E), which let deep nets diverge at large
            learning rates as nets without norms do. The generation task (a GAN, whose
            optimisers are stepped by the task itself) refuses it.
        schedule: ``constant``, ``multistep`` (x0.1 at 50% and 75% of the epochs) or ``cosine``.
        early_stopping_patience: stop after this many epochs without an improvement of the
            task's selection metric (the validation loss for classification); ``None`` trains
            every epoch.
        seeds: one run per seed and method; results report mean and std over seeds.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``, ...).
        devices: Lightning devices per machine (``auto``, a count, or a list of ids); more
            than one trains with DDP (gloo on CPUs, NCCL on GPUs), every norm layer computing
            its batch statistics over all processes (:func:`contextnorm.convert_sync`).
        num_nodes: machines of a multi-machine run (started by torchrun, SLURM or another
            Lightning cluster environment).
        precision: Lightning precision (``32-true``, ``16-mixed``, ``bf16-mixed``).
        num_workers: data loader worker processes.
        cpu_threads: CPU threads of PyTorch and of the BLAS/OpenMP pools (clustering,
            figures); ``None`` keeps the libraries' defaults. Small models train faster on one
            thread than on several, above all on a machine whose cores are busy.
        deterministic: ask PyTorch for deterministic algorithms (slower on GPU).
        progress: what is shown while training: ``auto`` (a live bar on a terminal, plain
            lines otherwise); ``bar`` (Lightning's bar, per epoch and batch, with the method,
            seed and metrics); ``epoch`` (a line per epoch and per run); ``run`` (a line per
            run); ``none``.
    """

    epochs: int = field(
        default=10,
        metadata={ROLE: CONTINUATION, CONTINUABLE_IF: _schedule_ignores_epochs},
    )
    batch_size: int = 128
    eval_batch_size: int | None = _execution(None)
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    gradient_clip: float | None = field(default=None, metadata={ROLE: OPTIONAL})
    schedule: str = "constant"
    early_stopping_patience: int | None = field(default=None, metadata={ROLE: CONTINUATION})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    accelerator: str = _execution("auto")
    devices: int | str | list[int] = _execution("auto")
    num_nodes: int = _execution(1)
    precision: str = "32-true"
    num_workers: int = _execution(0)
    cpu_threads: int | None = _execution(None)
    deterministic: bool = _execution(False)
    progress: str = _execution("auto")

    @property
    def clipping(self) -> str:
        """``", gradient norm clipped at 5"`` for the results' description; empty when off."""
        return (
            ""
            if self.gradient_clip is None
            else f", gradient norm clipped at {self.gradient_clip:g}"
        )

    def check(self) -> None:
        for key in ("epochs", "batch_size"):
            _require(
                getattr(self, key) >= 1,
                f"train.{key}",
                "must be a positive integer",
                getattr(self, key),
            )
        _require(
            self.eval_batch_size is None or self.eval_batch_size >= 1,
            "train.eval_batch_size",
            "must be a positive integer or null",
            self.eval_batch_size,
        )
        _require(self.lr > 0, "train.lr", "must be positive", self.lr)
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)", self.momentum)
        _require(
            self.gradient_clip is None or self.gradient_clip > 0,
            "train.gradient_clip",
            "must be positive or null (no clipping)",
            self.gradient_clip,
        )
        _require_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _require_choice("train.schedule", self.schedule, SCHEDULES)
        _require_choice("train.progress", self.progress, PROGRESS_MODES)
        _require(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "train.early_stopping_patience",
            "must be a positive integer or null (no early stopping)",
            self.early_stopping_patience,
        )
        _require(len(self.seeds) >= 1, "train.seeds", "must list at least one seed", self.seeds)
        _require(
            len(set(self.seeds)) == len(self.seeds),
            "train.seeds",
            "must not repeat a seed",
            self.seeds,
        )
        _require(self.num_workers >= 0, "train.num_workers", "must be >= 0", self.num_workers)
        _require(self.num_nodes >= 1, "train.num_nodes", "must be >= 1", self.num_nodes)
        _require(
            self.cpu_threads is None or self.cpu_threads >= 1,
            "train.cpu_threads",
            "must be a positive integer or null",
            self.cpu_threads,
        )


@dataclass
class PlotConfig:
    """Figures; the activation figures come from the first seed of each method.

    Attributes:
        enabled: draw figures (tables are always written).
        layer: which tested norm layer to record when a model holds several (placement
            ``all``), counted from the input.
        channel: channel of that layer whose input histogram is drawn.
        samples: number of held-out samples whose activations are recorded.
        tsne: add a t-SNE projection next to the PCA one (slower).
    """

    enabled: bool = True
    layer: int = 0
    channel: int = 0
    samples: int = 512
    tsne: bool = False

    def check(self) -> None:
        _require(self.layer >= 0, "plots.layer", "must be >= 0", self.layer)
        _require(self.channel >= 0, "plots.channel", "must be >= 0", self.channel)
        _require(self.samples >= 2, "plots.samples", "must be at least 2", self.samples)


@dataclass
class ReportConfig:
    """The results tables.

    Attributes:
        baseline: the label of the method every other method is compared with (paired
            differences over seeds, with 95 % intervals); ``None`` takes the first method.
    """

    baseline: str | None = None


@dataclass
class ExperimentConfig:
    """A whole experiment: every method in ``methods`` trained once per seed.

    Attributes:
        name: experiment name, shown in the results.
        output_dir: the results folder (``None``: ``runs/<name>``); finished runs in it are
            reused on a re-run, and methods run earlier stay in its tables.
        reuse: what a saved run (result or checkpoint) must share with the run asked for to be
            reused or resumed: ``settings`` (the default), or ``code``: the settings and the
            code version (:func:`contextnorm.runner.fingerprint.code_version`); a run made with
            other code is then trained again from the start.
        imports: Python modules imported before the experiment is built, so that the tasks,
            methods, models, data sets and context kinds they register can be named here.
        task: what is trained and measured; classification unless set.
    """

    name: str = _execution("experiment")
    output_dir: str | None = _execution(None)
    reuse: str = _execution("settings")
    imports: list[str] = _execution(default_factory=list)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    contexts: ContextConfig = field(default_factory=ContextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    methods: list[MethodConfig] = field(
        default_factory=lambda: [MethodConfig("bn"), MethodConfig("cn")]
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    plots: PlotConfig = _execution(default_factory=PlotConfig)
    report: ReportConfig = _execution(default_factory=ReportConfig)

    @property
    def results_dir(self) -> Path:
        """Where results go: ``output_dir``, or ``runs/<name>`` when it is not set."""
        return Path(self.output_dir or Path("runs") / self.name).expanduser()

    @property
    def baseline(self) -> str:
        """The label of the method the others are compared with."""
        return self.report.baseline or self.methods[0].display_name

    def check(self) -> None:
        for section in (self.data, self.contexts, self.train, self.plots):
            section.check()
        for method in self.methods:
            if method.contexts is not None:
                method.contexts.check()
        _require(
            self.reuse in REUSE_POLICIES,
            "reuse",
            f"must be one of {', '.join(REUSE_POLICIES)}",
            self.reuse,
        )
        _require(len(self.methods) >= 1, "methods", "must list at least one method", self.methods)
        labels = [method.display_name for method in self.methods]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        _require(
            not duplicates,
            "methods",
            f"has the row name(s) {duplicates} more than once; "
            "give repeated methods distinct `label`s",
            labels,
        )
        _require(
            self.report.baseline is None or self.report.baseline in labels,
            "report.baseline",
            f"must be the label of one of the methods ({', '.join(labels)})",
            self.report.baseline,
        )


def _require(condition: bool, key: str, rule: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key} {rule}; got {value!r}")


def _require_choice(key: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}", value)


# --- reading -----------------------------------------------------------------------------


def parse_config(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build a checked :class:`ExperimentConfig` from a plain mapping (a parsed YAML document)."""
    config = _build(ExperimentConfig, raw, "")
    config.check()
    return config


def load_config(source: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a config from a YAML file or a shipped config name, then apply ``key=value`` overrides.

    Args:
        source: a path to a YAML file, or the name of a config shipped with the package
            (``demo`` or ``demo.yaml``; see :func:`shipped_configs`).
        overrides: strings ``dotted.key=value``; the value is read as YAML (``3``, ``0.1``,
            ``[bn, cn]``, ``null``).
    """
    raw = read_yaml(_config_text(source)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config {source} must be a YAML mapping at the top level; got {type(raw).__name__}"
        )
    return parse_config(apply_overrides(raw, overrides))


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``contextnorm run NAME`` accepts them)."""
    folder = resources.files("contextnorm") / "configs"
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    )


def _config_text(source: str | Path) -> str:
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    name = str(source).removesuffix(".yaml")
    if name in shipped_configs():
        return (resources.files("contextnorm") / "configs" / f"{name}.yaml").read_text(
            encoding="utf-8"
        )
    raise ConfigError(
        f"config {str(source)!r} is neither a YAML file nor a shipped config; "
        f"shipped configs: {', '.join(shipped_configs())}"
    )


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``dotted.key=value`` override set (missing levels are created).

    Keys are not checked here; :func:`parse_config` rejects unknown ones with the valid keys.
    """
    result = _deep_copy(raw)
    for override in overrides:
        key, separator, text = override.partition("=")
        path = key.strip().split(".")
        if not separator or not all(path):
            raise ConfigError(
                f"override {override!r} must look like key.sub=value, e.g. train.epochs=5"
            )
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(path[: depth + 1])
                raise ConfigError(
                    f"override {override!r}: {prefix} holds a value, not a section with keys"
                )
            node = child
        node[path[-1]] = read_yaml(text) if text.strip() else None
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading ``1e-3`` and ``1.5e3`` as numbers.

    YAML 1.1, which PyYAML implements, wants a dot and a signed exponent (``1.0e-3``) and reads
    ``1e-3`` as a string; YAML 1.2 and every other language read it as a number.
    """


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text as configs are read: safely, with numbers in scientific notation."""
    return yaml.load(text, Loader=_Loader)


def parse_section(schema: type, raw: Any, path: str) -> Any:
    """Build the dataclass ``schema`` from a plain mapping with every check of the config.

    Tasks read their ``task.options`` with it, so that their settings are held to the same
    rules (unknown keys, types, scientific notation) as the rest of the config.

    Args:
        schema: a dataclass; its type hints say what each key holds.
        raw: the mapping read from YAML.
        path: where the mapping sits in the config (``task.options``), for messages.
    """
    section = _build(schema, raw, path)
    check = getattr(section, "check", None)
    if check is not None:
        check()
    return section


def _build(schema: type, raw: Any, path: str) -> Any:
    if isinstance(raw, str) and schema is MethodConfig:
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{path or 'the config'} must be a mapping of keys to values; got {raw!r}"
        )
    hints = get_type_hints(schema)
    valid = [f.name for f in dataclasses.fields(schema)]
    unknown = [key for key in raw if key not in valid]
    if unknown:
        raise ConfigError(
            f"unknown config key {_join(path, str(unknown[0]))!r}; valid keys"
            f"{' in ' + repr(path) if path else ''}: {', '.join(valid)}"
        )
    missing = [
        f.name
        for f in dataclasses.fields(schema)
        if f.name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config key {_join(path, missing[0])!r} is required")
    values = {key: _convert(hints[key], value, _join(path, key)) for key, value in raw.items()}
    return schema(**values)


def _convert(expected: Any, value: Any, path: str) -> Any:
    origin = get_origin(expected)
    if dataclasses.is_dataclass(expected):
        return _build(expected, value, path)
    if origin in (Union, types.UnionType):
        for option in get_args(expected):
            try:
                return _convert(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path} must be {_describe(expected)}; got {value!r}")
    if expected is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path} must be null; got {value!r}")
    if origin is list:
        (item_type,) = get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list; got {value!r}")
        return [_convert(item_type, item, f"{path}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
            raise ConfigError(f"{path} must be a mapping with string keys; got {value!r}")
        return dict(value)
    if expected is Any:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # `train_samples: 5e3` reads as the float 5000.0: a whole number is a valid integer.
    if expected is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    # bool is a subclass of int, and `epochs: yes` is a mistake rather than 1.
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path} must be {_describe(expected)}; got {value!r}")


def _describe(expected: Any) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        type(None): "null",
    }
    if get_origin(expected) in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(expected))
    if get_origin(expected) is list:
        return (
            f"a list of {_describe(get_args(expected)[0]).removeprefix('an ').removeprefix('a ')}s"
        )
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data (YAML and JSON serialisable), read back by :func:`parse_config`."""
    return dataclasses.asdict(config)


def dump_config(config: ExperimentConfig) -> str:
    """The config as YAML text (read back by :func:`read_yaml`)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
