"""The restart policy: what happens when a machine's main process exits on its own.

``no`` — the machine stops. ``always`` — it starts again, whatever the exit. ``on-failure`` —
it starts again after a failed exit (non-zero code, a signal, an OOM kill) while fewer than
``max_retries`` restarts happened since the last explicit start; then it stops. An exit the
orchestrator asked for (a stop, a restart, a destroy) never triggers the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .drivers.base import ExitStatus
from .machine import DEFAULT_MAX_RETRIES


@dataclass(frozen=True)
class RestartDecision:
    """Whether to restart, and why, in words an operator reads in the log: ``restart 1 of 2,
    policy on-failure`` or ``not restarted (max retries 2 reached)``."""

    restart: bool
    reason: str


def decide_restart(restart: Mapping[str, Any], exit_: ExitStatus, restarts: int) -> RestartDecision:
    """The policy's decision for ``exit_`` after ``restarts`` restarts since the last start."""
    policy = restart.get("policy", "on-failure")
    if exit_.requested_stop:
        return RestartDecision(False, "not restarted (the stop was requested)")
    if policy == "always":
        return RestartDecision(True, f"restart {restarts + 1}, policy always")
    if policy == "on-failure":
        limit = int(restart.get("max_retries", DEFAULT_MAX_RETRIES))
        if not exit_.failed:
            return RestartDecision(False, "not restarted (a clean exit, policy on-failure)")
        if restarts >= limit:
            return RestartDecision(False, f"not restarted (max retries {limit} reached)")
        return RestartDecision(True, f"restart {restarts + 1} of {limit}, policy on-failure")
    return RestartDecision(False, f"not restarted (policy {policy})")
