"""Experiment configuration: a typed schema, YAML files and ``key.sub=value`` overrides.

A config is read from YAML into the dataclasses below. Every key is checked: an unknown key
raises an error naming it and the valid keys at that level, a value of the wrong type names the
key and the expected type, and out-of-range values name the accepted range. Overrides from the
command line (``train.epochs=5``, ``methods=[bn,cn]``) are applied to the raw mapping before it
is checked, so they are held to the same rules as the file.

Only the checks that need no data happen here; the experiment checks contexts, data sets and
models against the loaded data before any training starts.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "multistep", "cosine")
AUGMENTATIONS = ("auto", "none", "crop_flip")
PROGRESS_MODES = ("none", "run", "epoch", "bar")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and the fix."""


@dataclass
class DataConfig:
    """Which data set to load and how to split it.

    Attributes:
        name: a data set name known to ``contextnorm.data.load_dataset`` (``contextnorm list``).
        root: data directory; ``None`` uses ``$CONTEXTNORM_DATA`` or ``~/.cache/contextnorm/data``.
            For ``image-folder`` it is the folder holding ``train/`` and ``test/``.
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
    """

    name: str = "digits"
    root: str | None = None
    image_size: int | None = None
    download: bool = False
    val_fraction: float = 0.1
    train_samples: int | None = None
    test_samples: int | None = None
    seed: int = 0
    augment: str = "auto"

    def check(self) -> None:
        _require(
            0.0 <= self.val_fraction < 1.0,
            "data.val_fraction",
            "must be in [0, 1)",
            self.val_fraction,
        )
        for key in ("image_size", "train_samples", "test_samples"):
            value = getattr(self, key)
            _require(
                value is None or value >= 1,
                f"data.{key}",
                "must be a positive integer or null",
                value,
            )
        _require_choice("data.augment", self.augment, AUGMENTATIONS)


@dataclass
class ContextConfig:
    """How each sample's context is built (``contextnorm.contexts.build_contexts``).

    Attributes:
        kind: ``kmeans``, ``gmm`` (EM components), ``superclass`` or ``domain``.
        num_contexts: K, the number of contexts; context layers are built with the same K.
            ``None`` takes K from the data (the number of domains or superclasses); clusterings
            need it set.
        seed: seed of the clustering, shared by every method and seed of the experiment so
            that all of them see the same contexts.
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
        name: model name (``contextnorm list``).
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
        name: a method registry name (``contextnorm list``).
        label: the row name in tables and plots; defaults to ``name``. Labels must be unique.
        options: keyword arguments for the layer (checked against its signature).
    """

    name: str
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        """The label shown in results (``label``, or ``name`` when no label is set)."""
        return self.label or self.name


@dataclass
class TrainConfig:
    """Optimisation and run settings.

    Attributes:
        epochs: training epochs per run.
        batch_size: training batch size (evaluation uses ``eval_batch_size`` or this).
        eval_batch_size: batch size for validation and test; ``None`` uses ``batch_size``.
        optimizer: ``adamw``, or ``sgd`` (with Nesterov momentum).
        lr: initial learning rate.
        weight_decay: weight decay of the optimizer.
        momentum: momentum of ``sgd``.
        schedule: ``constant``, ``multistep`` (x0.1 at 50% and 75% of the epochs) or ``cosine``.
        early_stopping_patience: stop after this many epochs without a lower validation loss;
            ``None`` trains every epoch.
        seeds: one run per seed and method; results report mean and std over seeds.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``, ...).
        devices: Lightning devices (``auto``, a count, or a list of ids).
        precision: Lightning precision (``32-true``, ``16-mixed``, ``bf16-mixed``).
        num_workers: data loader worker processes.
        cpu_threads: CPU threads of PyTorch and of the BLAS/OpenMP pools (clustering,
            figures); ``None`` keeps the libraries' defaults. Small models train faster on one
            thread than on several, above all on a machine whose cores are busy.
        deterministic: ask PyTorch for deterministic algorithms (slower on GPU).
        progress: what is printed while training: ``none``; ``run`` (one line per finished
            run); ``epoch`` (also one line per epoch); ``bar`` (one line per run and Lightning's
            per-batch progress bar).
    """

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int | None = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "constant"
    early_stopping_patience: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    precision: str = "32-true"
    num_workers: int = 0
    cpu_threads: int | None = None
    deterministic: bool = False
    progress: str = "run"

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
        _require(
            self.cpu_threads is None or self.cpu_threads >= 1,
            "train.cpu_threads",
            "must be a positive integer or null",
            self.cpu_threads,
        )


@dataclass
class PlotConfig:
    """Figures drawn from the first seed of each method.

    Attributes:
        enabled: draw figures (tables are always written).
        channel: channel of the tested norm layer whose input histogram is drawn.
        samples: number of test images whose activations are recorded.
        tsne: add a t-SNE projection next to the PCA one (slower).
        layer: which tested norm layer to record when a model holds several (placement
            ``all``), counted from the input.
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
class ExperimentConfig:
    """A whole experiment: every method in ``methods`` trained once per seed.

    Attributes:
        name: experiment name, shown in the results.
        output_dir: the results folder (``None``: ``runs/<name>``); finished runs in it are
            reused on a re-run.
    """

    name: str = "experiment"
    output_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    contexts: ContextConfig = field(default_factory=ContextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    methods: list[MethodConfig] = field(
        default_factory=lambda: [MethodConfig("bn"), MethodConfig("cn")]
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    plots: PlotConfig = field(default_factory=PlotConfig)

    @property
    def results_dir(self) -> Path:
        """Where results go: ``output_dir``, or ``runs/<name>`` when it is not set."""
        return Path(self.output_dir or Path("runs") / self.name).expanduser()

    def check(self) -> None:
        for section in (self.data, self.contexts, self.train, self.plots):
            section.check()
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
    raw = yaml.safe_load(_config_text(source)) or {}
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
        node[path[-1]] = yaml.safe_load(text) if text.strip() else None
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


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
    """The config as YAML text."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
