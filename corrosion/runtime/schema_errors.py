"""Schema errors as an operator reads them: the schema file that holds the statement at fault,
and the command that allows a change that loses data (the crdt layer knows neither)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from crdt.errors import DestructiveChangeRefused, SchemaError
from crdt.schema import source_of

DESTRUCTIVE_REMEDY = (
    "this loses data, so it is refused unless allowed: `corrosion reload --allow-destructive` "
    "(at start-up: `corrosion agent --allow-destructive`)"
)


def for_operator(exc: SchemaError, paths: Sequence[str | os.PathLike[str]]) -> SchemaError:
    """``exc`` reworded for the operator of an agent whose schema files are ``paths``."""
    if isinstance(exc, DestructiveChangeRefused):
        return SchemaError(f"{exc.what}; {DESTRUCTIVE_REMEDY}")
    if exc.statement is not None:
        try:
            source = source_of(exc.statement, [os.fspath(p) for p in paths])
        except (OSError, SchemaError):  # the files changed since: say it without the file
            source = None
        if source is not None:
            return SchemaError(f"{source}: {exc}", exc.statement)
    return exc
