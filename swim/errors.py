"""The base of every error ``swim`` raises, so a caller can catch the package's errors at once."""

from __future__ import annotations


class SwimError(Exception):
    """Base class of swim's errors."""


__all__ = ["SwimError"]
