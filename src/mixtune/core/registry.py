"""One generic name -> object registry; one instance per kind of thing (abilities, methods, ...)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mixtune.core.errors import UnknownNameError

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# A citation names an author and a year, or an arXiv id: "Yadav et al., 2023" / "arXiv:2306.01708".
_CITATION = re.compile(r"(arXiv:\d{4}\.\d{4,5})|([A-Z][\w-]+( et al\.)?,? \(?\d{4}\)?)")


class Registry(Generic[T]):
    """Maps snake_case names to objects of one kind.

    Registering a name twice is an error, and so (when ``require_citation``) is a
    function whose docstring does not open with a citation: the citation is
    written once, in the docstring, and read from there.

    Args:
        kind: what the entries are, used in messages ("ability", "merge method").
        require_citation: entries come from the literature and must cite it.
    """

    def __init__(self, kind: str, *, require_citation: bool = False) -> None:
        self.kind = kind
        self.require_citation = require_citation
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, *, doc: str | None = None) -> T:
        """Register ``entry`` under ``name``; ``doc`` is checked for a citation when required."""
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be snake_case (a-z, 0-9, _)")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
        if self.require_citation:
            first = (doc or "").strip().split("\n\n")[0]
            if not _CITATION.search(first):
                raise ValueError(
                    f"{self.kind} {name!r}: the docstring must open with a citation "
                    f"(authors, year or arXiv id); got {first[:80]!r}"
                )
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add` for functions: the docstring is the doc."""

        def wrap(fn: T) -> T:
            return self.add(name, fn, doc=getattr(fn, "__doc__", None))

        return wrap

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises with close matches and the full list."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
