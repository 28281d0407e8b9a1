"""The base of every error ``corrosion`` raises, so a caller can catch the package's errors at
once. Each error also keeps the builtin base its callers catch (ValueError, OSError, ...)."""

from __future__ import annotations


class CorrosionError(Exception):
    """Base class of corrosion's errors."""


__all__ = ["CorrosionError"]
