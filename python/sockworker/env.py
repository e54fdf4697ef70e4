"""``Env``: the bindings handed to every handler as ``env``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Env"]


class Env:
    """The bindings given to handlers: ``env.NAME`` for each item of ``App(env=...)`` and each
    Durable Object namespace of ``App(durable_objects=...)``. An unbound name raises
    ``AttributeError``."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.__dict__.update(values or {})

    def __getattr__(self, name: str) -> Any:
        # Only reached for a name that is not bound: says so (and types env.NAME as Any).
        raise AttributeError(f"env has no binding {name!r}")

    def __repr__(self) -> str:
        return f"Env({', '.join(sorted(self.__dict__))})"
