"""The restart policy: what happens when a machine's main process exits on its own.

``no`` — the machine stops. ``always`` — it starts again, whatever the exit. ``on-failure`` —
it starts again after a failed exit (non-zero code, a signal, an OOM kill) while fewer than
``max_retries`` restarts happened since the last explicit start; then it stops. An exit the
orchestrator asked for (a stop, a restart, a destroy) never triggers the policy.

Every automatic restart waits first, as Docker's restart policies do: 100 ms before the first,
doubling with each consecutive restart up to :data:`MAX_RESTART_DELAY` (one minute, Docker's
cap), so a command that exits at once costs one restart a minute, not one per driver start. A
boot that ran at least :data:`STEADY_RUN` seconds (Docker's 10 s) ends the streak: its exit
waits 100 ms again. An explicit start, restart or update starts a new streak too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .drivers.base import ExitStatus
from .engine import Backoff
from .machine import DEFAULT_MAX_RETRIES

MAX_RESTART_DELAY = 60.0
STEADY_RUN = 10.0


def default_restart_backoff() -> Backoff:
    """The default delays before automatic restarts: 100 ms doubling to one minute."""
    return Backoff(initial=0.1, maximum=MAX_RESTART_DELAY)


def next_streak(streak: int, ran: float) -> int:
    """The consecutive-restart count after a boot that ran ``ran`` seconds: one more, or 1
    (a fresh streak) when the boot ran long enough to count as healthy."""
    return 1 if ran >= STEADY_RUN else streak + 1


@dataclass(frozen=True)
class RestartDecision:
    """Whether to restart, and why, in words an operator reads in the log: ``restart 1 of 2,
    policy on-failure`` or ``not restarted (max retries 2 reached)``; :meth:`delayed` adds
    the wait before it."""

    restart: bool
    reason: str

    def delayed(self, delay: float) -> RestartDecision:
        """This decision with the backoff before the restart: ``..., in 0.8 s``."""
        return RestartDecision(self.restart, f"{self.reason}, in {delay:.3g} s")


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
