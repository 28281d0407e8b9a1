"""The restart policy: what happens when a machine's main process exits on its own.

``no`` — the machine stops. ``always`` — it starts again, whatever the exit. ``on-failure`` —
it starts again after a failed exit (non-zero code, a signal, an OOM kill) while fewer than
``max_retries`` restarts happened since the last explicit start; then it stops. An exit the
orchestrator asked for (a stop, a restart, a destroy) never triggers the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .drivers.base import ExitStatus


def should_restart(restart: Mapping[str, Any], exit_: ExitStatus, restarts: int) -> bool:
    if exit_.requested_stop:
        return False
    policy = restart.get("policy", "on-failure")
    if policy == "always":
        return True
    if policy == "on-failure":
        return exit_.failed and restarts < int(restart.get("max_retries", 10))
    return False
