"""Named registries: norms, inits, data sets, probes, tasks and studies are looked up by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from normlab.utils.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map whose `register` decorator refuses to silently replace an entry.

    `kind` is the setting name used in error messages ("norm", "init", "study", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and not overwrite:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered; "
                    "pass overwrite=True to replace it."
                )
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError.choice(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
