"""The base of every error ``corrosion`` raises, so a caller can catch the package's errors at
once. Each error also keeps the builtin base its callers catch (ValueError, OSError, ...)."""

from __future__ import annotations


class CorrosionError(Exception):
    """Base class of corrosion's errors."""


def sole_error(exc: BaseException) -> BaseException:
    """The one real error inside nested exception groups (task groups wrap what they raise), so
    a command line can say it in one line; ``exc`` itself when it is not such a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


__all__ = ["CorrosionError", "sole_error"]
