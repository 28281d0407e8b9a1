"""The base of every error ``simulations`` raises. ``orch_core.ProcessKilled`` is not one: like
``KeyboardInterrupt`` it is a ``BaseException`` that must unwind through ``except Exception``."""

from __future__ import annotations


class SimulationError(Exception):
    """Base class of the simulator's errors."""


__all__ = ["SimulationError"]
