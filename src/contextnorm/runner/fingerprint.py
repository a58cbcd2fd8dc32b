"""A run's settings, derived from the config schema, and what differs between two of them.

A (method, seed) run's settings are every config value that changes what the run computes:
the task, data, contexts, model and training sections, the run's own method and its seed.
Which values those are is read from the schema itself (``ROLE`` metadata of each field in
``contextnorm.config``): a new setting is part of every run's settings unless the schema says
it only changes how a run executes (or that its default is what runs computed before it
existed). The settings are stored with each checkpoint and result as plain data, so a mismatch
names each setting that differs and both of its values.

The settings say what a run computes, not with which code: :func:`code_version` names the
package source a run was made with, stored beside its settings, so that results made before
a change of the code can be told apart (and re-run with ``reuse: code``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contextnorm.config import (
    CONTINUABLE_IF,
    CONTINUATION,
    EXECUTION,
    OPTIONAL,
    ROLE,
    ExperimentConfig,
)

Settings = dict[str, Any]
"""Flat settings: dotted config key -> JSON value (``train.lr``, ``method.options.momentum``)."""


def run_settings(config: ExperimentConfig, index: int, seed: int) -> tuple[Settings, Settings]:
    """The settings of the run of ``config.methods[index]`` with ``seed``.

    Returns:
        ``(checkpoint, continuation)``: the settings a checkpoint belongs to, and those under
        which it can be continued (the early-stopping patience, and the epoch count when the
        learning-rate schedule does not depend on it). A finished result belongs to both.
    """
    checkpoint: Settings = {}
    continuation: Settings = {}
    for item in dataclasses.fields(config):
        if item.metadata.get(ROLE) == EXECUTION:
            continue
        if item.name == "methods":
            _flatten(config.methods[index], "method", checkpoint, continuation)
        else:
            _flatten(getattr(config, item.name), item.name, checkpoint, continuation)
    del checkpoint["train.seeds"]
    checkpoint["seed"] = seed
    return _plain(checkpoint), _plain(continuation)


def _flatten(value: Any, prefix: str, checkpoint: Settings, continuation: Settings) -> None:
    if not dataclasses.is_dataclass(value):
        checkpoint[prefix] = value
        return
    for item in dataclasses.fields(value):
        role = item.metadata.get(ROLE)
        if role == EXECUTION:
            continue
        key = f"{prefix}.{item.name}"
        field_value = getattr(value, item.name)
        if role == OPTIONAL and field_value == item.default:
            continue
        continuable = role == CONTINUATION and item.metadata.get(CONTINUABLE_IF, _always)(value)
        if continuable:
            continuation[key] = field_value
        elif isinstance(field_value, Mapping):
            # Options dicts: one setting per key, so a difference names the option.
            for option, option_value in field_value.items():
                checkpoint[f"{key}.{option}"] = option_value
            if not field_value:
                checkpoint[key] = {}
        else:
            _flatten(field_value, key, checkpoint, continuation)


def _always(_: Any) -> bool:
    return True


def _plain(settings: Settings) -> Settings:
    """The settings as they read back from JSON (tuples become lists, keys sorted)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: stored -> current`` for every setting that differs, in key order."""
    missing = object()
    lines = []
    for key in sorted(stored.keys() | current.keys()):
        before, after = stored.get(key, missing), current.get(key, missing)
        if before != after:
            lines.append(f"{key}: {_show(before, missing)} -> {_show(after, missing)}")
    return lines


def _show(value: Any, missing: object) -> str:
    return "(not set)" if value is missing else json.dumps(value)


@functools.cache
def code_version() -> str:
    """The package version and a digest of its source, e.g. ``0.1.0+3fa9c2d1e0b4``.

    Any edit of a module of the installed package (its Python modules and the native kernels'
    C++ source) changes the digest, whether or not it changes what a run computes; modules
    named in a config's ``imports`` are not included.
    """
    import contextnorm  # the package itself, loaded by now: a module-level import would be circular

    root = Path(contextnorm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.cpp")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return f"{contextnorm.__version__}+{digest.hexdigest()[:12]}"
