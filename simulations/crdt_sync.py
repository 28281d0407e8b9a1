"""A reference replication core: naive pull anti-entropy over real crdt databases.

This is the simulator's stand-in until corrosion's replication core (issue 5) is hosted here; it
also shows what a second core on a node looks like. Each node owns a real SQLite file (in the
world's directory, so it survives crashes) opened with ``crdt.connect`` and a site id drawn from
the node's seeded stream. Peers come from the sibling ``swim`` core's notifications. Every
``interval`` (with jitter) the core asks one random peer for every change after the last version
it pulled from that peer; the answer is merged and the peer's version remembered in the same
database (``__sim_pulled``), so a restart resumes where it stopped. Pulling everything from
everyone is slow but obviously convergent: connected nodes end with equal databases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

import crdt
from swim.events import MemberDown, MemberRenamed, MemberUp

from .network import Address
from .node import Core, CoreSpec, Port
from .swim_core import SWIM, SwimCore

__all__ = ["CRDT", "KV_SCHEMA", "CrdtSyncCore", "crdt_sync"]

CRDT = "crdt"

KV_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY NOT NULL, v TEXT, n INTEGER DEFAULT 0)",
    "SELECT crsql_as_crr('kv')",
)


class _SyncTick:
    __slots__ = ()


_TICK = _SyncTick()


class CrdtSyncCore(Core):
    """Pull anti-entropy of a crdt database (channel ``"crdt"``)."""

    name = CRDT

    def __init__(self, port: Port, schema: Sequence[str], interval: float) -> None:
        super().__init__(port)
        self.interval = interval
        self._rng = port.rng()
        site = port.rng("site").randbytes(16)  # used only when the database is created
        self.conn = crdt.connect(str(port.disk.path / "db.sqlite"), site_id=site)
        for sql in schema:
            self.conn.execute(sql)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS __sim_pulled (peer TEXT PRIMARY KEY, version INTEGER)"
        )
        self.peers: dict[Address, None] = {}
        self._pending: dict[int, Address] = {}
        self.pulls = 0
        self.merged = 0

    @property
    def site_id(self) -> bytes:
        return crdt.site_id(self.conn)

    # -- lifecycle and peers --------------------------------------------------------------------

    def start(self, now: float) -> None:
        membership = self.port.node.core_of(SWIM, SwimCore)
        if membership is not None:
            for m in membership.membership.members():
                self.peers[m.addr] = None
        self.port.set_timer(now + self._rng.random() * self.interval, _TICK)

    def stop(self) -> None:
        self.conn.close()

    def on_event(self, source: str, event: Any, now: float) -> None:
        t = type(event)
        if t is MemberUp or t is MemberRenamed:
            member = event.member if t is MemberUp else event.new
            self.peers[member.addr] = None
        elif t is MemberDown:
            self.peers.pop(event.member.addr, None)

    # -- writes ---------------------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A local write, in its own transaction."""
        with self.conn:
            self.conn.execute(sql, params)

    # -- pull -----------------------------------------------------------------------------------

    def on_timer(self, timer: Any, now: float) -> None:
        self.port.set_timer(now + self.interval * (0.5 + self._rng.random()), _TICK)
        if not self.peers or self._pending:
            return
        peer = self._rng.choice(sorted(self.peers))
        row = self.conn.execute(
            "SELECT version FROM __sim_pulled WHERE peer = ?", (_key(peer),)
        ).fetchone()
        since = row[0] if row else 0
        sid = self.port.open_stream(peer, msgpack.packb(since))
        self._pending[sid] = peer

    def on_stream_request(self, src: Address, data: bytes, now: float) -> list[bytes] | None:
        try:
            since = msgpack.unpackb(data)
        except (ValueError, TypeError, msgpack.UnpackException):  # a malformed request
            return None
        if type(since) is not int:
            return None
        head = crdt.db_version(self.conn)
        changes = [tuple(c) for c in crdt.changes_since(self.conn, since)]
        return [msgpack.packb([head, changes], use_bin_type=True)]

    def on_stream_reply(self, stream_id: int, frames: list[bytes], now: float) -> None:
        peer = self._pending.pop(stream_id, None)
        if peer is None or not frames:
            return
        head, changes = msgpack.unpackb(frames[0], raw=False)
        if changes:
            self.merged += crdt.merge(self.conn, [tuple(c) for c in changes])
        with self.conn:
            self.conn.execute(
                "INSERT INTO __sim_pulled VALUES (?, ?) "
                "ON CONFLICT(peer) DO UPDATE SET version = excluded.version",
                (_key(peer), head),
            )
        self.pulls += 1

    def on_stream_failed(self, stream_id: int, now: float) -> None:
        self._pending.pop(stream_id, None)


def _key(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


def crdt_sync(schema: Sequence[str] = KV_SCHEMA, interval: float = 2.0) -> CoreSpec:
    """A spec hosting :class:`CrdtSyncCore` (needs ``World(files=True)`` and a swim core)."""
    schema = tuple(schema)

    def build(port: Port) -> CrdtSyncCore:
        return CrdtSyncCore(port, schema, interval)

    return build
