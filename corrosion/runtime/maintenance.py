"""Operator commands that act on the runtime's parts (the admin socket's ``cluster rejoin``,
``cluster membership-states``, ``sync reconcile-gaps``, ``actor version``, ``subs list/info``),
as corrosion's admin commands do. Each runs on the event loop; database work runs in a worker
thread under the agent's database lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import anyio

import swim

from ..addresses import Address, format_addr
from ..core.replication import decode_meta
from ..core.store import Store
from ..errors import CorrosionError
from .subscriptions import Subscription, Subscriptions


class MaintenanceError(CorrosionError):
    """The command cannot do what was asked (unknown actor or subscription, nobody to rejoin
    through); the message says why."""


def parse_actor_id(text: str) -> bytes:
    """An actor id as corrosion writes it (a UUID) or as we do (32 hex digits)."""
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise MaintenanceError(f"actor id {text!r} is not a UUID or 32 hex digits") from None


async def rejoin(node: swim.SwimNode, bootstrap: Sequence[Address]) -> dict[str, Any]:
    """Exchange membership again with the bootstrap seeds and every member known (down ones
    included), announcing this node: after a partition or a long pause, members that marked
    it down see it alive again (SWIM renews its identity if they had it down)."""
    own = node.address
    seeds: list[Address] = []
    for addr in [*bootstrap, *(m.addr for m in node.all_members())]:
        if addr != own and addr not in seeds:
            seeds.append(addr)
    if not seeds:
        raise MaintenanceError("nobody to rejoin through: no gossip.bootstrap and no known member")
    try:
        answered = await node.join(seeds, timeout=5)
    except OSError as exc:
        raise MaintenanceError(f"rejoining failed: {exc}") from None
    return {"asked": [format_addr(a) for a in seeds], "answered": answered}


def membership_states(node: swim.SwimNode) -> list[dict[str, Any]]:
    """Every member SWIM knows (down and left ones too), as its failure detector holds it."""
    out = []
    for m in sorted(node.all_members(), key=lambda m: (m.addr, m.id.gen)):
        info = decode_meta(m.meta)
        out.append(
            {
                "id": {"addr": format_addr(m.addr), "gen": m.id.gen},
                "actor_id": info[0].hex() if info else None,
                "incarnation": m.incarnation,
                "state": m.state.name.capitalize(),  # foca's spelling: Alive, Suspect, Down
            }
        )
    return out


async def reconcile_gaps(store: Store, db_lock: anyio.Lock) -> dict[str, Any]:
    """Rewrite the gaps table where it disagrees with the bookkeeping (``Store.reconcile_gaps``)."""
    async with db_lock:
        done = await anyio.to_thread.run_sync(store.reconcile_gaps)
    return {
        "actors": len(store.bookie.actors),
        "reconciled": [
            {"actor_id": actor.hex(), "deleted": deleted, "inserted": inserted}
            for actor, deleted, inserted in done
        ],
    }


async def actor_version(store: Store, db_lock: anyio.Lock, actor: bytes, version: int) -> Any:
    """What this node holds of one version, in corrosion's shapes: ``{"partial": {...}}`` for a
    version received in part, ``{"current": {"db_version", "last_seq"}}`` for one held with its
    data, ``"cleared or unknown"`` otherwise."""
    booked = store.bookie.actors.get(actor)
    if booked is None:
        raise MaintenanceError(f"unknown actor id: {actor.hex()}")
    partial = booked.partials.get(version)
    if partial is not None:
        return {
            "partial": {
                "seqs": [list(r) for r in partial.seqs],
                "last_seq": partial.last_seq,
                "ts": partial.ts,
            }
        }
    if version not in booked.held:
        return "cleared or unknown"
    async with db_lock:
        row = await anyio.to_thread.run_sync(store.booked_version, actor, version)
    if row is None or row[0] is None:
        return "cleared or unknown"
    return {"current": {"db_version": row[0], "last_seq": row[1]}}


def _one_line(sql: str) -> str:
    return " ".join(line.strip() for line in sql.splitlines() if line.strip())


def subs_list(subscriptions: Subscriptions) -> list[dict[str, Any]]:
    return [
        {
            "id": sub.id,
            "hash": sub.hash,
            "sql": _one_line(sub.sql),
            "params": sub.params,
            "listeners": len(sub.listeners),
            "last_change_id": sub.change_id,
        }
        for sub in subscriptions.by_id.values()
    ]


def sub_info(subscriptions: Subscriptions, *, hash_: str | None, sid: str | None) -> dict:
    """One subscription, found by its hash (``corro-query-hash``) or its id."""
    sub: Subscription | None = None
    if hash_ is not None:
        sub = next((s for s in subscriptions.by_id.values() if s.hash == hash_), None)
    elif sid is not None:
        sub = subscriptions.by_id.get(sid)
    else:
        raise MaintenanceError("specify the subscription's hash or id")
    if sub is None:
        raise MaintenanceError("unknown subscription hash or id")
    return {
        "id": sub.id,
        "hash": sub.hash,
        "path": str(sub.file.directory) if sub.file is not None else None,
        "last_change_id": sub.change_id,
        "original_query": _one_line(sub.sql),
        "params": sub.params,
        "columns": list(sub.columns),
        "tables": sorted(sub.tables),
        "rows": len(sub.rows),
        "listeners": len(sub.listeners),
    }
