"""One generic registry, one instance per pluggable family (datasets, architectures,
pruning criteria, attribution methods, calibrators, treatments)."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from medscalpel.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories.

    Example:
        >>> r = Registry("colour")
        >>> @r.register("red")
        ... def make_red(): return "#f00"
        >>> r.create("red")
        '#f00'
    """

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str | None = None):  # noqa: A002
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ConfigError(f"{self.family} '{name}' is registered twice.")
            self._items[name] = obj
            doc = help if help is not None else (obj.__doc__ or "").strip().splitlines()[:1]
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise ConfigError(f"Unknown {self.family} '{name}'. Valid names: {valid}.")
        return self._items[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        return {n: self._help[n] for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
