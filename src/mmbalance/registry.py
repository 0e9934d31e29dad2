"""Registries with metadata (methods, datasets, fusions) and "did you mean" suggestions."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, Iterator, List, Tuple, TypeVar

from .errors import RegistryError

T = TypeVar("T")


def suggest(name: str, candidates: List[str], n: int = 3) -> str:
    """Return a " Did you mean 'x'?" suffix, or "" when nothing is close."""
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not close:
        low = {c.lower().replace("-", "_"): c for c in candidates}
        key = name.lower().replace("-", "_")
        if key in low:
            close = [low[key]]
    if not close:
        return ""
    return " Did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return str(self.meta.get("description", ""))


class Registry(Generic[T]):
    """A named collection of objects with metadata. Duplicate names are errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = Entry(name, obj, meta)
            return obj

        return deco

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            names = sorted(self._entries)
            raise RegistryError(
                f"Unknown {self.kind} '{name}'.{suggest(name, names)} "
                f"Available: {', '.join(names)}"
            )
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Tuple[str, Entry[T]]]:
        return iter(sorted(self._entries.items()))

    def __len__(self) -> int:
        return len(self._entries)
