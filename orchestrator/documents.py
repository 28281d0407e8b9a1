"""The machine documents of one worker: lookup, listing, and the one path that changes them.

Each machine has one document (state, config, lease, events, ...) kept in memory and persisted
in its step-log database. Every change takes the same locked path: copy the current document,
apply the changes, stamp ``updated_at``, persist, make the copy current, then notify (waiters,
and the service's hook that publishes and watches). API calls use :meth:`Documents.update`,
which persists the document alone; the engine's committer uses :meth:`Documents.commit_staged`,
which persists it with a step's COMPLETE. Both hold the machine's document lock, so no writer
loses another's change.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio

from .clock import Clock
from .errors import InvalidRequestError, NotFoundError

Change = Callable[[dict[str, Any]], object]
Persist = Callable[[dict[str, Any]], Awaitable[None]]

APP_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
APP_RULE = "1 to 63 lowercase letters, digits and hyphens, starting with a letter or digit"


def check_app(app: str) -> str:
    """``app`` if it is a valid app name, else InvalidRequestError saying the rule."""
    if not isinstance(app, str) or not APP_RE.match(app):
        raise InvalidRequestError(f"invalid app name {app!r}: an app name is {APP_RULE}")
    return app


class Documents:
    """The current documents by machine id, and the machines destroyed and archived since the
    service started (so a waiter on ``destroyed`` still finds them)."""

    def __init__(
        self,
        clock: Clock,
        *,
        write: Callable[[str, dict[str, Any]], Awaitable[None]],
        on_change: Callable[[str], None],
    ) -> None:
        self._clock = clock
        self._write = write  # persists a document alone (for ``update``)
        self._on_change = on_change
        self._docs: dict[str, dict[str, Any]] = {}
        self._gone: dict[str, str] = {}  # machine id -> app, for machines archived while running
        self._changed: dict[str, anyio.Event] = {}
        self._doc_locks: dict[str, anyio.Lock] = {}
        self._request_locks: dict[str, anyio.Lock] = {}

    def reset(self, docs: Mapping[str, dict[str, Any]], gone: Mapping[str, str]) -> None:
        """Start over from what was read from disk (the service may be entered again)."""
        self._docs = dict(docs)
        self._gone = dict(gone)
        self._changed.clear()

    # --- lookup and listing -------------------------------------------------------------------

    def ids(self) -> list[str]:
        return sorted(self._docs)

    def find(self, machine_id: str) -> dict[str, Any] | None:
        return self._docs.get(machine_id)

    def get(self, machine_id: str) -> dict[str, Any]:
        """The current document (a reference: do not mutate it, use :meth:`update`)."""
        try:
            return self._docs[machine_id]
        except KeyError:
            raise NotFoundError(f"machine {machine_id} not found") from None

    def in_app(self, app: str, machine_id: str) -> dict[str, Any]:
        """The document of a machine of ``app``; NotFoundError for a machine of another app."""
        check_app(app)
        doc = self._docs.get(machine_id)
        if doc is None or doc["app"] != app:
            raise NotFoundError(f"machine {machine_id} not found in app {app}")
        return doc

    def of_app(self, app: str, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The documents of ``app`` (in one of ``states`` when given), oldest first."""
        check_app(app)
        wanted = None if states is None else set(states)
        docs = [
            d
            for d in self._docs.values()
            if d["app"] == app and (wanted is None or d["state"] in wanted)
        ]
        return sorted(docs, key=lambda d: (d["created_at"], d["id"]))

    def archived_here(self, app: str, machine_id: str) -> bool:
        """Whether the machine was destroyed and archived since the service started."""
        return self._gone.get(machine_id) == app

    # --- changes ------------------------------------------------------------------------------

    def request_lock(self, machine_id: str) -> anyio.Lock:
        """Serializes a request's check-then-act on one machine (validate against the document,
        then submit or change), so two requests never both pass a check only one may pass."""
        return self._request_locks.setdefault(machine_id, anyio.Lock())

    def add(self, machine_id: str, doc: dict[str, Any]) -> None:
        """A new machine, whose document its creator has already persisted."""
        self._docs[machine_id] = doc
        self._notify(machine_id)

    def retire(self, machine_id: str) -> None:
        """The machine was destroyed and its database archived: forget its document."""
        doc = self._docs.pop(machine_id, None)
        if doc is not None:
            self._gone[machine_id] = doc["app"]
        self._notify(machine_id)

    async def update(self, machine_id: str, change: Change) -> dict[str, Any]:
        """Apply ``change`` to a copy of the document, persist it, then make it current."""
        return await self._change(machine_id, [change], functools.partial(self._write, machine_id))

    async def commit_staged(self, machine_id: str, changes: list[Change], commit: Persist) -> None:
        """The engine's doc committer: apply a step's staged changes and write the document
        with the step's COMPLETE (``commit``)."""
        await self._change(machine_id, changes, commit)

    async def _change(
        self, machine_id: str, changes: Iterable[Change], persist: Persist
    ) -> dict[str, Any]:
        async with self._doc_locks.setdefault(machine_id, anyio.Lock()):
            doc = copy.deepcopy(self.get(machine_id))
            for change in changes:
                change(doc)
            doc["updated_at"] = self._clock.now()
            await persist(doc)
            self._docs[machine_id] = doc
        self._notify(machine_id)
        return doc

    # --- notification -------------------------------------------------------------------------

    def next_change(self, machine_id: str) -> anyio.Event:
        """An event set at the machine's next change (a new document, or its retirement)."""
        return self._changed.setdefault(machine_id, anyio.Event())

    def _notify(self, machine_id: str) -> None:
        event = self._changed.pop(machine_id, None)
        if event is not None:
            event.set()
        self._on_change(machine_id)


__all__ = ["APP_RE", "APP_RULE", "Documents", "check_app"]
