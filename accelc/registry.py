"""A registry: the named entries of one kind (passes, targets, model families, runtime backends,
generation loops), each registered once by the module that defines it.

The built-in modules are imported on `load_all()`, not at import time, so listing a registry is
cheap and a module's heavy dependencies load only when it runs. Every kind's registry is one of
these, so adding an entry of any kind reads the same: one module, one `register` call, one line
in its registry's list of built-in modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from accelc.errors import InternalError, UsageError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, read like a dict. `what` names the kind in messages ("pass", "loop")."""

    def __init__(self, what: str, modules: tuple[str, ...], key: Callable[[T], str] = lambda entry: entry.name):
        self.what = what
        self.modules = modules
        self._key = key
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add `entry` under its name; usable as a class decorator. A second entry under one name
        is a bug in accelc (or in a plug-in), not a user's input."""
        name = self._key(entry)
        if name in self._entries and self._entries[name] is not entry:
            raise InternalError(f"two entries register the {self.what} '{name}'")
        self._entries[name] = entry
        return entry

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Remove and return the entry `name` (tests register toy entries and take them out again)."""
        return self._entries.pop(name, default)

    def load_all(self) -> Registry[T]:
        """Import the built-in modules, which register their entries; returns the registry."""
        for module in self.modules:
            importlib.import_module(module)
        return self

    def require(self, name: str) -> T:
        """The entry `name` after loading the built-in ones, or a UsageError listing the known names."""
        self.load_all()
        if name not in self._entries:
            raise UsageError(f"unknown {self.what} '{name}'; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        """Names in the order of the built-in modules' list, whatever order they were imported in
        (families are asked in this order: the first that recognises a model takes it); entries
        of one module, and ones from elsewhere (after all built-ins), in registration order."""
        rank = {module: i for i, module in enumerate(self.modules)}

        def place(name: str) -> int:
            return rank.get(getattr(self._entries[name], "__module__", None), len(rank))

        return iter(sorted(self._entries, key=place))

    def __len__(self) -> int:
        return len(self._entries)
