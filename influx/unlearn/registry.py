"""The unlearning methods by name: a read-only mapping whose missing names are explained."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping


class UnknownMethodError(KeyError):
    """A name that is no unlearning method; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class Methods(Mapping):
    """Name -> method. Looking up a name that is not there raises :class:`UnknownMethodError`
    (a ``KeyError``) naming the closest valid name and all of them."""

    def __init__(self, methods: Mapping[str, Callable]):
        self._methods = dict(methods)

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._methods[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), self._methods, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownMethodError(
                f"no unlearning method {name!r}: {hint}the methods are {sorted(self._methods)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"Methods({sorted(self._methods)})"
