"""Waiting for a machine to reach a state (the Machines API's ``/wait``).

A waiter sleeps on the machine's next-change event (:meth:`Documents.next_change`) and checks
again after each change, on the service's clock, so a simulated clock drives it too. A
destroyed machine satisfies ``destroyed`` after its database was archived as well: the
documents remember the machines archived since start, and older ones are looked up in the
archive store.
"""

from __future__ import annotations

from collections.abc import Callable

from . import machine as m
from .clock import Clock, wait_until
from .documents import Documents, check_app
from .errors import InvalidRequestError, NotFoundError

MAX_WAIT = 3600.0


class Waiter:
    def __init__(self, docs: Documents, clock: Clock, archived: Callable[[str], bool]) -> None:
        self._docs = docs
        self._clock = clock
        self._archived = archived  # whether the archive store holds the machine's database

    async def wait_machine(
        self,
        app: str,
        machine_id: str,
        *,
        state: str = m.STARTED,
        timeout: float = 60.0,
        instance_id: str | None = None,
    ) -> bool:
        """Until the machine is in ``state`` (and on ``instance_id`` when given); False on
        timeout. A destroyed machine satisfies ``destroyed`` after it was archived too."""
        if state not in m.WAITABLE:
            raise InvalidRequestError(
                f"state: cannot wait for {state!r} (one of {', '.join(sorted(m.WAITABLE))})"
            )
        if not 0 < timeout <= MAX_WAIT:
            raise InvalidRequestError(f"timeout: expected seconds in (0, {int(MAX_WAIT)}]")
        check_app(app)
        docs = self._docs
        known = docs.find(machine_id) is not None or docs.archived_here(app, machine_id)
        if not known and not self._archived(machine_id):
            raise NotFoundError(f"machine {machine_id} not found in app {app}")
        deadline = self._clock.now() + timeout

        def satisfied() -> bool:
            doc = docs.find(machine_id)
            if doc is None:
                return state == m.DESTROYED
            if doc["app"] != app:
                return False
            if instance_id is not None and doc["instance_id"] != instance_id:
                return False
            return doc["state"] == state

        while not satisfied():
            left = deadline - self._clock.now()
            if left <= 0:
                return False
            await wait_until(self._clock, docs.next_change(machine_id).wait, left)
        return True


__all__ = ["MAX_WAIT", "Waiter"]
