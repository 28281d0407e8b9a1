"""Machine leases: while one is held, mutating calls must present its nonce.

A lease lives in the machine's document (``lease``: nonce, owner, description, expiry,
version); an expired one counts as none (:func:`machine.active_lease`). Taking, extending and
releasing one are document changes like any other (:meth:`Documents.update`), made under the
machine's request lock so that a check and its change are one step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import machine as m
from .clock import Clock
from .documents import Documents
from .errors import InvalidRequestError, LeaseError, NotFoundError
from .ids import IdFactory

MAX_LEASE_TTL = 3600 * 24


def parse_ttl(value: Any) -> float:
    """A lease's time to live in seconds, from a request."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError("ttl: expected a number of seconds")
    if not 0 < value <= MAX_LEASE_TTL:
        raise InvalidRequestError(f"ttl: expected seconds in (0, {MAX_LEASE_TTL}]")
    return float(value)


class Leases:
    def __init__(self, docs: Documents, clock: Clock, ids: IdFactory) -> None:
        self._docs = docs
        self._clock = clock
        self._ids = ids

    def new(self, nonce: str, ttl: float, owner: str, description: str) -> dict[str, Any]:
        """A lease held by ``owner`` for ``ttl`` seconds from now."""
        return {
            "nonce": nonce,
            "owner": owner,
            "description": description,
            "expires_at": self._clock.now() + ttl,
            "version": self._ids.ulid(),
        }

    def check(self, doc: Mapping[str, Any], nonce: str | None) -> None:
        """LeaseError unless the machine is unleased or ``nonce`` is its lease's."""
        lease = m.active_lease(doc, self._clock.now())
        if lease is not None and nonce != lease["nonce"]:
            why = "a wrong nonce" if nonce else "no nonce"
            raise LeaseError(
                f"machine {doc['id']} is leased by {lease['owner']} until "
                f"{m.iso(lease['expires_at'])}; the request had {why} "
                "(send it in the fly-machine-lease-nonce header)"
            )

    async def acquire(
        self, app: str, machine_id: str, *, ttl: Any = 30, description: str = "",
        owner: str = "api", nonce: str | None = None,
    ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Take the lease (or extend it when ``nonce`` is the holder's). Returns the lease view
        with its nonce and whether it is new."""
        seconds = parse_ttl(ttl)
        if not isinstance(description, str) or len(description) > 1024:
            raise InvalidRequestError("description: expected a string of at most 1024 characters")
        async with self._docs.request_lock(machine_id):
            doc = self._docs.in_app(app, machine_id)
            current = m.active_lease(doc, self._clock.now())
            if current is not None and nonce != current["nonce"]:
                raise LeaseError(
                    f"lease currently held by {current['owner']} until "
                    f"{m.iso(current['expires_at'])}"
                )
            if current is not None:
                lease = dict(current, expires_at=self._clock.now() + seconds)
            else:
                lease = self.new(self._ids.nonce(), seconds, owner, description)
            await self._docs.update(machine_id, lambda d: d.__setitem__("lease", lease))
        return m.lease_view(lease, with_nonce=True), current is None

    def get(self, app: str, machine_id: str) -> dict[str, Any]:
        lease = m.active_lease(self._docs.in_app(app, machine_id), self._clock.now())
        if lease is None:
            raise NotFoundError(f"machine {machine_id} has no lease")
        return m.lease_view(lease, with_nonce=False)

    async def release(self, app: str, machine_id: str, *, nonce: str | None) -> None:
        async with self._docs.request_lock(machine_id):
            doc = self._docs.in_app(app, machine_id)
            lease = m.active_lease(doc, self._clock.now())
            if lease is None:
                raise NotFoundError(f"machine {machine_id} has no lease")
            if nonce != lease["nonce"]:
                raise LeaseError(f"machine {machine_id}: the lease nonce does not match")
            await self._docs.update(machine_id, lambda d: d.__setitem__("lease", None))


__all__ = ["MAX_LEASE_TTL", "Leases", "parse_ttl"]
