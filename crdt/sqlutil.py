"""Small helpers for building SQL text safely (identifier and literal quoting)."""

from __future__ import annotations

from collections.abc import Iterable


def ident(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """Quote a string as an SQL literal."""
    return "'" + text.replace("'", "''") + "'"


def idents(names: Iterable[str], prefix: str = "") -> str:
    return ", ".join(prefix + ident(n) for n in names)


def placeholders(n: int) -> str:
    return ", ".join("?" * n)
