"""One registry idiom for everything a config names: methods, data sets, models, contexts, tasks.

Each kind of entry has one :class:`Registry`. An entry is registered where it is defined, with
the registry's decorator (or the same call with the entry as an argument), looked up with
:meth:`Registry.get`, whose error names every registered entry, and listed with its one-line
summary by ``contextnorm list``::

    from contextnorm.tasks import TASKS, Task

    @TASKS.register("my-task")
    class MyTask(Task):
        '''One line that `contextnorm list` shows.'''

    METHODS.register("my-norm", NormMethod(...), summary="what it computes")

The registries: ``contextnorm.methods.METHODS``, ``contextnorm.data.DATASETS``,
``contextnorm.models.MODELS``, ``contextnorm.contexts.CONTEXTS`` and
``contextnorm.tasks.TASKS``. A config's ``imports:`` list names modules to import before an
experiment is built, so entries registered in a user's own module can be used by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

Entry = TypeVar("Entry")


class UnknownNameError(KeyError, ValueError):
    """A name that no entry of a registry has; the message lists the registered names."""

    def __str__(self) -> str:
        # KeyError's own str() shows the repr of its argument, quotes and escapes included.
        return str(self.args[0])


class Registry(Generic[Entry]):
    """Named entries of one kind, in registration order.

    Args:
        kind: what an entry is, for messages (``"task"``, ``"data set"``).
        plural: the plural of ``kind``; defaults to ``kind + "s"``.
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, Entry] = {}
        self._summaries: dict[str, str] = {}

    @overload
    def register(self, name: str, *, summary: str | None = None) -> Callable[[Entry], Entry]: ...

    @overload
    def register(self, name: str, entry: Entry, *, summary: str | None = None) -> Entry: ...

    def register(self, name: str, entry: Any = None, *, summary: str | None = None) -> Any:
        """Register ``entry`` as ``name``; without ``entry``, a decorator that registers.

        Args:
            name: the name configs use.
            entry: the object to register (a class, a function or any object).
            summary: one line for ``contextnorm list``; defaults to the first line of the
                entry's docstring.

        Raises:
            ValueError: another entry is registered under ``name``.
        """

        def add(item: Entry) -> Entry:
            present = self._entries.get(name)
            if present is not None and present is not item:
                raise ValueError(
                    f"a {self.kind} named {name!r} is already registered ({present!r}); "
                    "register yours under another name"
                )
            self._entries[name] = item
            self._summaries[name] = summary or _first_line(item)
            return item

        return add if entry is None else add(entry)

    def get(self, name: str) -> Entry:
        """The entry registered as ``name``.

        Raises:
            UnknownNameError: no entry has that name; the message lists the registered ones.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.plural}: {', '.join(self)}"
            ) from None

    def summary(self, name: str) -> str:
        """The one-line description of ``name``."""
        self.get(name)
        return self._summaries[name]

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, Entry]]:
        """(name, entry) pairs, in registration order."""
        return list(self._entries.items())

    def __getitem__(self, name: str) -> Entry:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self)})"


def _first_line(entry: object) -> str:
    text = (getattr(entry, "__doc__", None) or "").strip()
    return text.splitlines()[0].strip() if text else ""
