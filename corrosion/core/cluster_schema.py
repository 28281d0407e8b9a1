"""The cluster schema: schema changes as replicated, ordered versions that every node applies.

A schema change proposed on one node (``corrosion schema apply``, or ``corrosion reload`` with
``db.schema_source = "cluster"``) becomes a *schema version*: a row of the internal CRR table
``__corro_schema_versions`` holding the whole schema text, its hash, a version number, the hash
of the version it was based on (its parent), the proposing actor, the proposal's timestamp and
whether it is destructive. The row is an ordinary replicated write: broadcast and sync carry it
like data, and the bookkeeping makes sure every node receives it.

Rules (each node runs the same pure function on the same rows, so all nodes agree):

* **The chain.** Version 1 has the empty parent; version ``v`` extends the chain only if its
  parent is the hash of the chain's version ``v - 1``. When two proposals share a version
  number and a parent (two proposers at once), the one with the earliest ``proposed_at`` wins,
  then the lowest actor id: it is the chain's version ``v``; the other is a *losing* proposal,
  never applied by a node that already knows the winner, and reported. Proposals with the same
  text have the same hash: they are the same version, not a conflict. A row whose parent is not
  on the chain (a loser's descendant, or a version whose parent has not arrived yet) waits.
* **Applying.** A node following the cluster (``follow``) applies the chain's versions after the
  one it runs, in order, each in its own savepoint inside the transaction that brought it:
  additive changes always, destructive ones only if the version was proposed with
  ``allow_destructive``. A version that fails (a constraint the node's data violates, a column
  the node changed by hand) stops the node there: the failure is recorded (``blocked``) and
  reported, the version's successors wait, and the replication of everything else goes on:
  changes for tables or columns this node does not have yet are kept (``pending_schema``).
* **Losing after applying.** A node can apply a proposal before it hears of the one that beats
  it. When the winner arrives it returns to the chain: the losing versions it ran must have
  been additive, and going to the winner may drop only the tables and columns that the losing
  version defines and the winner does not (what the loser added); otherwise the node stops,
  blocked, and says why. No node ends on a schema no proposer wrote.
* **Proposing** writes the row and applies it here in the same transaction, so a proposal this
  node cannot apply (invalid, or destructive without ``allow_destructive``) writes nothing. A
  proposal with the hash of the chain's head changes nothing.

Threads: the functions taking a connection run in the store's worker thread, inside its
transactions; ``ClusterSchemaStatus`` belongs to the event loop, which installs what they return.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import apsw

import crdt
from crdt.errors import DestructiveChangeRefused, SchemaError
from crdt.schema import (
    SchemaOutcome,
    introspect,
    parse_schema,
    reconcile_schema,
    split_statements,
)

from ..errors import CorrosionError

TABLE = "__corro_schema_versions"
TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    version INTEGER NOT NULL, actor_id BLOB NOT NULL,
    parent TEXT NOT NULL DEFAULT '', hash TEXT NOT NULL DEFAULT '', sql TEXT NOT NULL DEFAULT '',
    destructive INTEGER NOT NULL DEFAULT 0, proposed_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (version, actor_id));
"""
_STATE_KEY = "cluster_schema"  # in __corro_state: JSON {"version", "hash"} this node runs
_BLOCKED_KEY = "cluster_schema_blocked"  # in __corro_state: why the next version did not apply
GENESIS = ""  # the parent of version 1

_COLUMNS = "version, actor_id, parent, hash, sql, destructive, proposed_at"


class ProposalRefused(CorrosionError):
    """A schema proposal was not written: invalid, destructive without ``allow_destructive``,
    or this node is not on the cluster's latest version. Nothing was changed."""


@dataclass(frozen=True)
class SchemaVersion:
    version: int
    actor_id: bytes
    parent: str
    hash: str
    sql: str
    destructive: bool
    proposed_at: int

    def describe(self) -> str:
        return f"version {self.version} ({self.hash[:12]}, proposed by {self.actor_id.hex()})"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "hash": self.hash,
            "parent": self.parent,
            "actor_id": self.actor_id.hex(),
            "destructive": self.destructive,
            "proposed_at": self.proposed_at,
        }


def normalize(sql: str) -> str:
    """The schema text that is hashed and replicated: its statements without comments, one per
    line (so two files that differ only in comments or blank lines are the same version)."""
    return ";\n".join(split_statements(sql)) + (";" if sql.strip() else "")


def schema_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_table(conn: apsw.Connection) -> None:
    """Create the versions table and make it a CRR (idempotent; inside the store's migration)."""
    conn.execute(TABLE_SQL)
    crdt.as_crr(conn, TABLE)


def read_versions(conn: apsw.Connection) -> list[SchemaVersion]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM {TABLE} ORDER BY version, actor_id").fetchall()
    return [
        SchemaVersion(v, a, p, h, s, bool(d), t)
        for v, a, p, h, s, d, t in cast("list[tuple[Any, ...]]", rows)
    ]


def _rank(v: SchemaVersion) -> tuple[int, bytes]:
    """Among proposals for one version number and parent, the lowest rank wins."""
    return (v.proposed_at, v.actor_id)


def chain(versions: list[SchemaVersion]) -> list[SchemaVersion]:
    """The cluster's schema history by the rules above: ``chain[i]`` is version ``i + 1``."""
    by_step: dict[tuple[int, str], list[SchemaVersion]] = {}
    for v in versions:
        by_step.setdefault((v.version, v.parent), []).append(v)
    out: list[SchemaVersion] = []
    parent = GENESIS
    while True:
        candidates = by_step.get((len(out) + 1, parent))
        if not candidates:
            return out
        winner = min(candidates, key=_rank)
        out.append(winner)
        parent = winner.hash


def losers(versions: list[SchemaVersion], history: list[SchemaVersion]) -> list[SchemaVersion]:
    """Proposals that lost: those that competed with a chain version (same number and parent,
    other text), and those proposed on top of one (their proposer had not heard of the
    winner yet). A proposal whose parent has not arrived is waiting, not lost."""
    on_chain = {(v.version, v.parent): v.hash for v in history}
    lost: dict[tuple[int, str], None] = {}  # (version, hash) of losing rows, in order
    out = []
    for v in sorted(versions, key=lambda v: (v.version, v.actor_id)):
        winner = on_chain.get((v.version, v.parent))
        if (winner is not None and winner != v.hash) or (v.version - 1, v.parent) in lost:
            lost[(v.version, v.hash)] = None
            out.append(v)
    return out


def lost_cells(versions: list[SchemaVersion], history: list[SchemaVersion]) -> frozenset[Any]:
    """``(table, column)`` pairs only losing proposals define (never the chain's head): their
    changes, written on nodes that ran a loser before moving to the winner, are dropped by
    every node (those nodes dropped them in the move), so that all nodes hold the same data."""
    beaten = losers(versions, history)
    if not beaten or not history:
        return frozenset()
    head = parse_schema(history[-1].sql)
    out = set()
    for v in beaten:
        for name, table in parse_schema(v.sql).items():
            kept = head.get(name)
            for col in table.columns:
                if kept is None or col not in kept.columns:
                    out.add((name, col))
    return frozenset(out)


@dataclass(frozen=True)
class Running:
    """The cluster version a node runs: 0 and the empty hash before its first."""

    version: int = 0
    hash: str = GENESIS


def running(conn: apsw.Connection) -> Running:
    row = conn.execute("SELECT value FROM __corro_state WHERE key = ?", (_STATE_KEY,)).fetchone()
    if row is None:
        return Running()
    obj = json.loads(row[0])
    return Running(int(obj["version"]), str(obj["hash"]))


def _set_running(conn: apsw.Connection, v: SchemaVersion) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO __corro_state (key, value) VALUES (?, ?)",
        (_STATE_KEY, json.dumps({"version": v.version, "hash": v.hash})),
    )


def _set_blocked(conn: apsw.Connection, reason: str | None) -> None:
    if reason is None:
        conn.execute("DELETE FROM __corro_state WHERE key = ?", (_BLOCKED_KEY,))
    else:
        conn.execute(
            "INSERT OR REPLACE INTO __corro_state (key, value) VALUES (?, ?)",
            (_BLOCKED_KEY, reason),
        )


def blocked(conn: apsw.Connection) -> str | None:
    row = conn.execute("SELECT value FROM __corro_state WHERE key = ?", (_BLOCKED_KEY,)).fetchone()
    return None if row is None else cast("str", row[0])


@dataclass
class Advance:
    """What following the chain did in one transaction (installed on the loop)."""

    applied: list[SchemaVersion] = field(default_factory=list)  # versions applied, in order
    changes: list[str] = field(default_factory=list)  # what they changed (crdt.schema's words)
    blocked: str | None = None  # why the node stopped, when it did
    running: Running = field(default_factory=Running)
    head: SchemaVersion | None = None  # the chain's last version
    history: list[SchemaVersion] = field(default_factory=list)  # the chain
    losers: list[SchemaVersion] = field(default_factory=list)

    @property
    def moved(self) -> bool:
        return bool(self.applied)


def _reconcile(
    conn: apsw.Connection, v: SchemaVersion, extra: str, *, allow_destructive: bool
) -> SchemaOutcome:
    sql = v.sql if not extra else f"{v.sql}\n;\n{extra}"
    return reconcile_schema(conn, sql, allow_destructive=allow_destructive)


def _apply_text(
    conn: apsw.Connection, v: SchemaVersion, extra: str, *, allow_destructive: bool
) -> list[str]:
    return _reconcile(conn, v, extra, allow_destructive=allow_destructive).changes


def _may_leave(conn: apsw.Connection, lost: SchemaVersion, winner: SchemaVersion) -> str | None:
    """Why this node, running the losing ``lost``, cannot drop what ``winner`` lacks: None when
    every table and column the winner does not define is one ``lost`` defines (its additions)."""
    live = introspect(conn)
    mine, theirs = parse_schema(lost.sql), parse_schema(winner.sql)
    for name, table in live.items():
        want = theirs.get(name)
        if want is None:
            if name not in mine:
                return f"table {name!r} is in neither version"
            continue
        for col, cdef in table.columns.items():
            other = want.columns.get(col)
            if other is None and col not in mine.get(name, want).columns:
                return f"column {name}.{col} is in neither version"
            if other is not None and not other.same_definition(cdef):
                return f"column {name}.{col} is defined differently by {winner.describe()}"
    return None


def _lineage(
    versions: list[SchemaVersion], history: list[SchemaVersion], here: Running
) -> list[SchemaVersion]:
    """The versions off the chain that led to ``here``, oldest first (empty if unknown)."""
    by_key = {(v.version, v.hash): v for v in versions}
    out: list[SchemaVersion] = []
    v = by_key.get((here.version, here.hash))
    while v is not None:
        out.append(v)
        on_chain = history[v.version - 2].hash if v.version >= 2 else GENESIS
        if v.version >= 2 and len(history) < v.version - 1:
            return []  # the chain does not reach this far: wait
        if v.parent == on_chain:
            return out[::-1]
        v = by_key.get((v.version - 1, v.parent))
    return []


def advance(conn: apsw.Connection, extra: str = "", *, follow: bool = True) -> Advance:
    """Apply the chain's versions after the one this node runs, each in a savepoint (inside the
    caller's transaction); stop at the first that fails and record why. ``extra``: schema this
    node adds to every version (its extensions'); ``follow=False`` only reads."""
    versions = read_versions(conn)
    history = chain(versions)
    out = Advance(
        head=history[-1] if history else None,
        history=history,
        losers=losers(versions, history),
    )
    here = running(conn)
    out.running = here
    out.blocked = blocked(conn)
    if not follow or (history and here.version == len(history) and history[-1].hash == here.hash):
        return out
    start = here.version
    if here.version and (
        here.version > len(history) or history[here.version - 1].hash != here.hash
    ):
        # this node runs a losing proposal: back to the chain where the lineages part
        lineage = _lineage(versions, history, here)
        if not lineage:
            return out  # its parent's place on the chain is not known yet: wait
        fork = lineage[0].version - 1
        if fork >= len(history):
            return out  # the winner has not arrived: nothing to go to yet
        lost, winner = lineage[-1], history[fork]
        if any(v.destructive for v in lineage):
            reason: str | None = "it was destructive"
        else:
            reason = _may_leave(conn, lost, winner)
        if reason is not None:
            out.blocked = (
                f"this node runs the losing proposal {lost.describe()} and cannot move to the "
                f"winner {winner.describe()}: {reason}"
            )
            _set_blocked(conn, out.blocked)
            return out
        try:
            with conn:
                out.changes += _apply_text(conn, winner, extra, allow_destructive=True)
        except (SchemaError, apsw.Error) as exc:
            out.blocked = f"moving to {winner.describe()} failed: {exc}"
            _set_blocked(conn, out.blocked)
            return out
        _set_running(conn, winner)
        out.applied.append(winner)
        out.running = Running(winner.version, winner.hash)
        start = winner.version
    for v in history[start:]:
        try:
            with conn:  # SAVEPOINT: a version applies whole or not at all
                out.changes += _apply_text(conn, v, extra, allow_destructive=v.destructive)
        except (SchemaError, apsw.Error) as exc:
            what = str(exc)
            if isinstance(exc, DestructiveChangeRefused):
                what = f"{exc.what} (the version was not proposed with --allow-destructive)"
            out.blocked = f"cannot apply {v.describe()}: {what}"
            _set_blocked(conn, out.blocked)
            return out
        _set_running(conn, v)
        out.applied.append(v)
        out.running = Running(v.version, v.hash)
    if out.blocked is not None:
        out.blocked = None
        _set_blocked(conn, None)
    return out


@dataclass
class Proposal:
    """A proposal written (``new``) or found already at the head (not ``new``)."""

    version: SchemaVersion
    new: bool
    changes: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # live tables it does not list, kept


def propose(
    conn: apsw.Connection,
    sql: str,
    actor: bytes,
    ts: int,
    extra: str = "",
    *,
    allow_destructive: bool = False,
) -> Proposal:
    """Write ``sql`` as the next version and apply it here (inside the caller's transaction;
    raises ``ProposalRefused`` or ``SchemaError`` with nothing written)."""
    text = normalize(sql)
    if not text:
        raise ProposalRefused("the schema is empty: nothing to propose")
    parse_schema(text)  # SchemaError for anything but tables, indexes and ordered lists
    history = chain(read_versions(conn))
    head = history[-1] if history else None
    here = running(conn)
    if head is not None and (here.version, here.hash) != (head.version, head.hash):
        raise ProposalRefused(
            f"this node runs cluster schema version {here.version} but the cluster is at "
            f"{head.describe()}; it must apply that first ({blocked(conn) or 'not applied yet'})"
        )
    digest = schema_hash(text)
    if head is not None and head.hash == digest:
        if allow_destructive:  # the cluster's schema already: only drop what it does not list
            done = _reconcile(conn, head, extra, allow_destructive=True)
            return Proposal(head, new=False, changes=done.changes)
        unlisted = [name for name in introspect(conn) if name not in parse_schema(text)]
        return Proposal(head, new=False, unlisted=unlisted)
    version = SchemaVersion(
        (head.version if head else 0) + 1,
        actor,
        head.hash if head else GENESIS,
        digest,
        text,
        False,
        ts,
    )
    conn.execute("SAVEPOINT propose_schema")
    try:
        try:
            done = _reconcile(conn, version, extra, allow_destructive=False)
        except DestructiveChangeRefused:
            if not allow_destructive:
                raise
            version = SchemaVersion(**{**version.__dict__, "destructive": True})
            done = _reconcile(conn, version, extra, allow_destructive=True)
        conn.execute(
            f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                version.version,
                version.actor_id,
                version.parent,
                version.hash,
                version.sql,
                int(version.destructive),
                version.proposed_at,
            ),
        )
        _set_running(conn, version)
        _set_blocked(conn, None)
    except BaseException:
        conn.execute("ROLLBACK TO propose_schema")
        conn.execute("RELEASE propose_schema")
        raise
    conn.execute("RELEASE propose_schema")
    return Proposal(version, new=True, changes=done.changes, unlisted=done.unlisted)


def outcome(
    conn: apsw.Connection, proposed: SchemaVersion
) -> tuple[SchemaVersion | None, SchemaVersion | None]:
    """``(winner, head)``: the chain's version at ``proposed.version`` (None while there is
    none) and the chain's head, as this node sees them now."""
    history = chain(read_versions(conn))
    at = history[proposed.version - 1] if len(history) >= proposed.version else None
    return at, (history[-1] if history else None)


class ClusterSchemaStatus:
    """What ``/v1/health``, metrics and the logs show about the cluster schema. Owned by the
    event loop, which installs each ``Advance`` in commit order."""

    def __init__(self, log: logging.Logger, *, follow: bool) -> None:
        self._log = log
        self.follow = follow
        self.running = Running()
        self.head: SchemaVersion | None = None
        self.history: list[SchemaVersion] = []
        self.blocked: str | None = None
        self.losers: list[SchemaVersion] = []
        self.drift: str | None = None  # how this node's files disagree with the cluster schema
        self.applied_total = 0
        self.blocked_total = 0  # times a version failed to apply (since start)

    def install(self, adv: Advance) -> None:
        for v in adv.applied:
            self._log.info("cluster schema %s applied", v.describe(), extra={"fields": v.to_json()})
        for change in adv.changes:
            self._log.info("schema applied: %s", change, extra={"fields": {"change": change}})
        self.applied_total += len(adv.applied)
        if adv.blocked is not None and adv.blocked != self.blocked:
            self.blocked_total += 1
            self._log.error("cluster schema stopped: %s", adv.blocked)
        elif adv.blocked is None and self.blocked is not None:
            self._log.info("cluster schema no longer blocked: runs version %d", adv.running.version)
        known = {(v.version, v.actor_id) for v in self.losers}
        for v in adv.losers:
            if (v.version, v.actor_id) not in known:
                self._log.warning(
                    "schema proposal %s lost to a concurrent proposal and is ignored; its "
                    "proposer must re-base on the cluster schema",
                    v.describe(),
                )
        self.losers = adv.losers
        self.blocked = adv.blocked
        self.running = adv.running
        self.head = adv.head
        self.history = adv.history

    def at(self, version: int) -> SchemaVersion | None:
        """The chain's version ``version``, as last installed (None: not known yet)."""
        return self.history[version - 1] if 0 < version <= len(self.history) else None

    def set_drift(self, drift: str | None) -> None:
        if drift is not None and drift != self.drift:
            self._log.warning("schema drift: %s", drift)
        self.drift = drift

    def to_json(self) -> dict[str, Any]:
        head = self.head
        return {
            "source": "cluster" if self.follow else "files",
            "version": self.running.version,
            "hash": self.running.hash,
            "cluster_version": head.version if head else 0,
            "cluster_hash": head.hash if head else GENESIS,
            "blocked": self.blocked,
            "drift": self.drift,
            "losing_proposals": [v.to_json() for v in self.losers],
        }
