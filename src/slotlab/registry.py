"""A tiny name -> factory registry (timm's ``create_model`` / ``list_models`` pattern)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from slotlab.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories so that a config string selects an implementation.

    Example:
        >>> GROUPINGS = Registry("grouping")
        >>> @GROUPINGS.register("slot_attention")
        ... class SlotAttention: ...
        >>> GROUPINGS.names()
        ['slot_attention']
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})")
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
