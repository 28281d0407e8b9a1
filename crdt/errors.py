"""Errors raised by the CRR engine.

Every error that reaches SQL is an ``apsw.SQLError`` subclass so that callers using plain SQL
(``SELECT crsql_as_crr('t')``, ``INSERT INTO crsql_changes ...``) see an ordinary SQL error whose
message says what was wrong, and the statement (or the merge transaction) rolls back.
"""

from __future__ import annotations

import apsw


class CrdtError(apsw.SQLError):
    """Base class: a CRR operation was refused; nothing was changed."""


class PackError(CrdtError):
    """A packed primary-key blob is malformed, or values cannot be packed."""


class IncompatibleTableError(CrdtError):
    """A table cannot become a CRR (no primary key, unique index, foreign key, ...)."""


class MergeError(CrdtError):
    """An incoming change is invalid (unknown table or column, bad types, oversize fields)."""


class SchemaError(CrdtError):
    """A schema file is invalid, or applying it would lose data without ``allow_destructive``."""

    def __init__(self, message: str, statement: str | None = None) -> None:
        super().__init__(message)
        self.statement = statement  # the schema statement at fault, when it is one


class DestructiveChangeRefused(SchemaError):
    """Applying the schema would lose data (``what``), and ``allow_destructive`` was not set."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}; this loses data, so it is refused unless applied with allow_destructive=True"
        )
        self.what = what
