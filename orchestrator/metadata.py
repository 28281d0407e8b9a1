"""Machine metadata: string key/values in the machine's config (``config.metadata``).

Setting or deleting a key is a document change under the machine's request lock, honours the
lease, and is refused once the machine is being destroyed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import machine as m
from .documents import Documents
from .errors import InvalidRequestError, InvalidTransitionError, NotFoundError
from .leases import Leases


class Metadata:
    def __init__(self, docs: Documents, leases: Leases) -> None:
        self._docs = docs
        self._leases = leases

    def get(self, app: str, machine_id: str) -> dict[str, str]:
        return dict(self._docs.in_app(app, machine_id)["config"].get("metadata", {}))

    async def set(
        self, app: str, machine_id: str, key: str, value: Any, *, nonce: str | None = None
    ) -> None:
        if not isinstance(key, str) or not m.METADATA_KEY.match(key):
            raise InvalidRequestError(f"invalid metadata key {key!r}")
        if not isinstance(value, str) or len(value) > 4096:
            raise InvalidRequestError("value: expected a string of at most 4096 characters")
        await self._change(app, machine_id, nonce, lambda md: md.__setitem__(key, value))

    async def delete(
        self, app: str, machine_id: str, key: str, *, nonce: str | None = None
    ) -> None:
        if key not in self._docs.in_app(app, machine_id)["config"].get("metadata", {}):
            raise NotFoundError(f"machine {machine_id} has no metadata key {key!r}")
        await self._change(app, machine_id, nonce, lambda md: md.pop(key, None))

    async def _change(
        self,
        app: str,
        machine_id: str,
        nonce: str | None,
        change: Callable[[dict[str, str]], object],
    ) -> None:
        async with self._docs.request_lock(machine_id):
            doc = self._docs.in_app(app, machine_id)
            self._leases.check(doc, nonce)
            if doc["state"] in (m.DESTROYING, m.DESTROYED):
                raise InvalidTransitionError(f"machine {machine_id} is {doc['state']}")
            await self._docs.update(
                machine_id, lambda d: change(d["config"].setdefault("metadata", {}))
            )


__all__ = ["Metadata"]
