"""One machine's durable log: its runs, their step events, and the machine's document.

Rules this file enforces (the engine relies on them):

* Every write is one ``BEGIN IMMEDIATE`` transaction on a WAL database with ``synchronous=FULL``:
  when a method returns, its event is on disk; when it raises, nothing was written.
* Events of a run are numbered 0, 1, 2, ... with no gaps; START is event 0 and is written in the
  same transaction as the run row, so a run exists if and only if its START does.
* At most one *active* run per action, unless the caller asks to queue: the check and the insert
  share the transaction, so two concurrent starts cannot both win.
* A run is replayed from its events only (no code replay): COMPLETE marks a step done and carries
  the accumulated response, ERROR carries the retry count, CANCEL halts the run, FINISH closes it.
* The run's trace context is written with its START and never changes, so every process that
  executes the run (after a crash, a redeploy) continues the same trace.

* Compaction (``compact``) only ever folds *finished* runs, oldest first, into ``history`` (one
  row per run, its events as a JSON list) in one transaction; active runs, which a restart
  replays, are never touched, and the newest finished runs stay replayable (``get_run``).

Callers never see SQL: the surface is append and scan (plus compaction, itself an append to
``history`` and a removal of what it now holds). One connection per database, used by one
thread at a time (a lock), opened lazily so the store can close idle logs to save descriptors.

* Opening never migrates. A database of an older schema answers reads as it is (a read the old
  schema cannot answer migrates first); the first write migrates it (lazily, in the writer's
  thread, one transaction), or the store's background migrator does (:mod:`.migrations`). When
  the migration fails the file is left as it was, reads keep working, and every write raises
  :class:`~.steplog_schema.MigrationFailedError` naming the reason.
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import apsw

from crdt import CrdtError

from .errors import AlreadyRunningError, UnknownRunError
from .steplog_schema import (
    CURRENT,
    CURRENT_TARGET,
    FAILED,
    MigrationFailedError,
    SchemaStatus,
    SchemaTarget,
    migrate,
    read_status,
)


class EventKind(enum.StrEnum):
    START = "start"
    COMPLETE = "complete"
    ERROR = "error"
    CANCEL = "cancel"
    FINISH = "finish"


class RunStatus(enum.StrEnum):
    ACTIVE = "active"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Event:
    seq: int
    kind: EventKind
    step: str | None
    payload: Any
    retry_count: int
    at: float


@dataclass(frozen=True)
class RunRecord:
    """What START records: the run's identity, input, and the step names fixed at that moment."""

    run_id: str
    action: str
    steps: tuple[str, ...]
    finalizers: tuple[str, ...]
    request: Mapping[str, Any]
    created_at: float
    # the W3C trace context the run started in ({"traceparent": ...}); empty without tracing
    trace: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunState:
    """A run as replayed from its events."""

    record: RunRecord
    seq: int
    status: RunStatus = RunStatus.ACTIVE
    completed: list[str] = field(default_factory=list)
    response: dict[str, Any] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    halt: dict[str, Any] | None = None
    finished_at: float | None = None
    last_event: int = 0

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def action(self) -> str:
        return self.record.action


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class MachineLog:
    """Append/scan access to one machine's database file."""

    def __init__(
        self,
        path: str | Path,
        *,
        vfs: str | None = None,
        target: SchemaTarget = CURRENT_TARGET,
        failed: SchemaStatus | None = None,
        on_status: Callable[[SchemaStatus], None] | None = None,
    ) -> None:
        """``vfs``: an SQLite VFS registered under that name (``simulations.faulty_vfs``).
        ``target``: the schema writes need. ``failed``: a failure already seen for this file
        (by an earlier MachineLog of the store), so it is not retried on every write.
        ``on_status``: told each status this log learns (on open, after a migration), from the
        thread that learned it."""
        self.path = Path(path)
        self.vfs = vfs
        self.target = target
        self._lock = threading.RLock()
        self._conn: apsw.Connection | None = None
        self._status: SchemaStatus | None = failed
        self._on_status = on_status

    # --- connection ---------------------------------------------------------------------------

    def _db(self) -> apsw.Connection:
        if self._conn is None:
            conn = apsw.Connection(str(self.path), vfs=self.vfs)
            try:
                conn.set_busy_timeout(10_000)
                mode = cast(str, conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0])
                if mode.lower() != "wal":
                    raise RuntimeError(f"{self.path}: could not enable WAL (got {mode})")
                conn.execute("PRAGMA synchronous=FULL")
                status = read_status(conn, self.target)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            if self._status is None or self._status.state != FAILED:
                self._set_status(status)
        return self._conn

    def _set_status(self, status: SchemaStatus) -> None:
        self._status = status
        if self._on_status is not None:
            self._on_status(status)

    @property
    def status(self) -> SchemaStatus | None:
        """The schema status learned when the file was opened or migrated (None before)."""
        return self._status

    def open(self) -> None:
        """Open (creating and migrating if needed) now rather than on first use."""
        with self._lock:
            self._current(self._db())

    def migrate(self) -> SchemaStatus:
        """Migrate the file to ``target`` now if it is older; a failure is recorded and returned
        (state FAILED, the reason in ``error``), not raised: the file is left as it was."""
        with self._lock:
            try:
                self._current(self._db())
            except MigrationFailedError:
                pass
            except (apsw.Error, CrdtError) as e:  # the file cannot even be opened
                self._set_status(SchemaStatus(0, "", FAILED, f"{type(e).__name__}: {e}"))
            assert self._status is not None
            return self._status

    def _current(self, conn: apsw.Connection) -> apsw.Connection:
        """``conn``, migrated to ``target`` first if it is older (the lazy migration)."""
        status = self._status
        if status is not None and status.state == CURRENT:
            return conn
        if status is None or status.state != FAILED:
            try:
                # no fsync of its own: a migration lost to a power cut leaves the old version
                # (re-migrated on the next open); the next FULL commit or the checkpoint on
                # close makes it durable with the rest of the WAL
                conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._set_status(migrate(conn, self.target))
                finally:
                    conn.execute("PRAGMA synchronous=FULL")
                return conn
            except (apsw.Error, CrdtError) as e:
                found = read_status(conn, self.target) if status is None else status
                status = SchemaStatus(found.version, found.hash, FAILED, f"{type(e).__name__}: {e}")
                self._set_status(status)
        raise MigrationFailedError(
            f"{self.path.name}: schema version {status.version} could not be migrated to "
            f"{self.target.version} ({status.error}); the database was left as it was and takes "
            "no writes until it is repaired"
        )

    def _read(self, fn: Callable[[apsw.Connection], Any]) -> Any:
        """Run a read on the schema the file has; if an older schema cannot answer it, migrate
        and run it again (a failed migration raises MigrationFailedError)."""
        with self._lock:
            conn = self._db()
            try:
                return fn(conn)
            except apsw.SQLError:
                if self._status is not None and self._status.state == CURRENT:
                    raise
            return fn(self._current(conn))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def checkpoint(self) -> None:
        """Fold the WAL into the main file (before the file is copied into an archive)."""
        with self._lock:
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _write(self, fn, *args):
        with self._lock:
            conn = self._current(self._db())
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return result

    # --- appends ------------------------------------------------------------------------------

    def start_run(
        self,
        record: RunRecord,
        *,
        exclusive: bool = True,
        doc: Mapping[str, Any] | None = None,
    ) -> int:
        """Write the run row and its START event; with ``exclusive``, refuse a second active run
        of the same action (AlreadyRunningError names the holder). ``doc``, when given, replaces
        the machine document in the same transaction. Returns the run's sequence number."""
        request = _dumps(dict(record.request))

        def tx(conn: apsw.Connection) -> int:
            if exclusive:
                row = conn.execute(
                    "SELECT run_id FROM runs WHERE status = 'active' AND action = ? "
                    "ORDER BY seq LIMIT 1",
                    (record.action,),
                ).fetchall()
                if row:
                    raise AlreadyRunningError(self.path.stem, record.action, cast(str, row[0][0]))
            conn.execute(
                "INSERT INTO runs (run_id, action, steps, finalizers, request, created_at, trace) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.run_id,
                    record.action,
                    _dumps(list(record.steps)),
                    _dumps(list(record.finalizers)),
                    request,
                    record.created_at,
                    _dumps(dict(record.trace)) if record.trace else None,
                ),
            )
            seq = conn.last_insert_rowid()
            conn.execute(
                "INSERT INTO events (run_seq, seq, kind, step, payload, retry_count, at) "
                "VALUES (?, 0, 'start', NULL, NULL, 0, ?)",
                (seq, record.created_at),
            )
            if doc is not None:
                self._put_doc(conn, doc, record.created_at)
            return seq

        return self._write(tx)

    def append(
        self,
        run_id: str,
        kind: EventKind,
        *,
        step: str | None,
        payload: Any = None,
        retry_count: int = 0,
        at: float,
        doc: Mapping[str, Any] | None = None,
    ) -> int:
        """Append COMPLETE / ERROR / CANCEL to an active run; returns the event's sequence.
        ``doc``, when given, replaces the machine document in the same transaction (a step's
        effect on the document and its completion are one fact)."""
        if kind not in (EventKind.COMPLETE, EventKind.ERROR, EventKind.CANCEL):
            raise ValueError(f"append() takes complete/error/cancel events, not {kind}")
        text = None if payload is None else _dumps(payload)

        def tx(conn: apsw.Connection) -> int:
            seq = self._active_seq(conn, run_id)
            event = self._insert_event(conn, seq, kind, step, text, retry_count, at)
            if doc is not None:
                self._put_doc(conn, doc, at)
            return event

        return self._write(tx)

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        *,
        error: Mapping[str, Any] | None,
        response: Mapping[str, Any],
        at: float,
    ) -> None:
        """Append FINISH and close the run (it stops counting as active)."""
        if status is RunStatus.ACTIVE:
            raise ValueError("finish() needs a final status")

        def tx(conn: apsw.Connection) -> None:
            seq = self._active_seq(conn, run_id)
            self._insert_event(
                conn, seq, EventKind.FINISH, None, _dumps({"status": str(status)}), 0, at
            )
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, error = ?, response = ? "
                "WHERE seq = ?",
                (
                    str(status),
                    at,
                    None if error is None else _dumps(dict(error)),
                    _dumps(dict(response)),
                    seq,
                ),
            )

        self._write(tx)

    def write_doc(self, doc: Mapping[str, Any], *, at: float) -> None:
        """Replace the machine's document."""
        self._write(lambda conn: self._put_doc(conn, doc, at))

    @staticmethod
    def _put_doc(conn: apsw.Connection, doc: Mapping[str, Any], at: float) -> None:
        conn.execute(
            "INSERT INTO machine (id, doc, updated_at) VALUES (1, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
            (_dumps(dict(doc)), at),
        )

    @staticmethod
    def _active_seq(conn: apsw.Connection, run_id: str) -> int:
        rows = conn.execute("SELECT seq, status FROM runs WHERE run_id = ?", (run_id,)).fetchall()
        if not rows:
            raise UnknownRunError(f"run {run_id} not found")
        seq, status = cast("tuple[int, str]", rows[0])
        if status != RunStatus.ACTIVE:
            raise ValueError(f"run {run_id} is {status}; its log is closed")
        return seq

    @staticmethod
    def _insert_event(conn, run_seq, kind, step, text, retry_count, at) -> int:
        nxt = conn.execute(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM events WHERE run_seq = ?", (run_seq,)
        ).fetchall()[0][0]
        conn.execute(
            "INSERT INTO events (run_seq, seq, kind, step, payload, retry_count, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_seq, nxt, str(kind), step, text, retry_count, at),
        )
        return nxt

    def compact(self, keep: int) -> int:
        """Fold every finished run except the newest ``keep`` into ``history``; returns how many
        runs were folded. Active runs are never folded, whatever their age."""
        if keep < 1:
            raise ValueError("compact() keeps at least one finished run")

        def tx(conn: apsw.Connection) -> int:
            rows = conn.execute(
                "SELECT seq FROM runs WHERE status != 'active' ORDER BY seq DESC LIMIT -1 OFFSET ?",
                (keep,),
            ).fetchall()
            for (seq,) in rows:
                # [kind, step, retry_count, at] each: numbered without gaps, seq is the position
                events = [
                    list(row)
                    for row in conn.execute(
                        "SELECT kind, step, retry_count, at FROM events WHERE run_seq = ? "
                        "ORDER BY seq",
                        (seq,),
                    ).fetchall()
                ]
                conn.execute(
                    "INSERT INTO history (seq, run_id, action, steps, finalizers, status, "
                    "created_at, finished_at, request, error, events, trace) SELECT seq, run_id, "
                    "action, steps, finalizers, status, created_at, finished_at, request, error, "
                    "?, trace FROM runs WHERE seq = ?",
                    (_dumps(events), seq),
                )
                conn.execute("DELETE FROM events WHERE run_seq = ?", (seq,))
                conn.execute("DELETE FROM runs WHERE seq = ?", (seq,))
            return len(rows)

        return self._write(tx)

    # --- scans --------------------------------------------------------------------------------

    def read_doc(self) -> dict[str, Any] | None:
        rows = self._read(lambda c: c.execute("SELECT doc FROM machine WHERE id = 1").fetchall())
        return json.loads(cast(str, rows[0][0])) if rows else None

    def active_runs(self) -> list[RunState]:
        """Every run without FINISH, replayed, oldest first."""
        return self._runs("WHERE status = 'active' ORDER BY seq", ())

    def get_run(self, run_id: str) -> RunState | None:
        runs = self._runs("WHERE run_id = ?", (run_id,))
        return runs[0] if runs else None

    def history(self, limit: int = 50) -> list[RunState]:
        """The most recent runs, finished or not, newest first."""
        return self._runs("ORDER BY seq DESC LIMIT ?", (int(limit),))

    def sizes(self) -> dict[str, int]:
        """Row counts of the log's tables (how big compaction keeps it)."""
        return cast(
            "dict[str, int]",
            self._read(
                lambda conn: {
                    t: cast(int, conn.execute(f"SELECT COUNT(*) FROM {t}").fetchall()[0][0])
                    for t in ("runs", "events", "history")
                }
            ),
        )

    def timeline(self) -> list[dict[str, Any]]:
        """Every run this machine ever had, oldest first, compacted or not: action, its declared
        steps and finalizers, status, times, error, its trace id (None untraced) and its step
        events (the ``events`` endpoint's answer)."""
        return cast("list[dict[str, Any]]", self._read(self._timeline))

    @staticmethod
    def _timeline(conn: apsw.Connection) -> list[dict[str, Any]]:
        rows = conn.execute(
            "SELECT seq, run_id, action, steps, finalizers, status, created_at, finished_at, "
            "error, trace, events, 1 FROM history UNION ALL SELECT seq, run_id, action, "
            "steps, finalizers, status, created_at, finished_at, error, trace, NULL, 0 "
            "FROM runs ORDER BY seq"
        ).fetchall()
        out = []
        for (seq, run_id, action, steps, fins, status, created, finished, err, trace, events,
             compacted) in rows:  # fmt: skip
            if events is None:
                rows_ = conn.execute(
                    "SELECT kind, step, retry_count, at FROM events WHERE run_seq = ? ORDER BY seq",
                    (seq,),
                ).fetchall()
            else:
                rows_ = json.loads(cast(str, events))
            events_list = [
                {"seq": i, "kind": k, "step": st, "retry_count": rc, "at": at}
                for i, (k, st, rc, at) in enumerate(rows_)
            ]
            out.append({
                "run_id": run_id, "action": action,
                "steps": json.loads(cast(str, steps)),
                "finalizers": json.loads(cast(str, fins)), "status": status,
                "created_at": created, "finished_at": finished,
                "error": None if err is None else json.loads(cast(str, err)),
                "trace_id": _trace_id(cast("str | None", trace)),
                "compacted": bool(compacted), "events": events_list,
            })  # fmt: skip
        return out

    def events(self, run_id: str) -> list[Event]:
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT e.seq, e.kind, e.step, e.payload, e.retry_count, e.at FROM events e "
                "JOIN runs r ON r.seq = e.run_seq WHERE r.run_id = ? ORDER BY e.seq",
                (run_id,),
            ).fetchall()
        )
        return [
            Event(s, EventKind(k), st, None if p is None else json.loads(p), rc, at)
            for s, k, st, p, rc, at in cast(
                "list[tuple[int, str, str | None, str | None, int, float]]", rows
            )
        ]

    def _runs(self, where: str, params: Sequence[Any]) -> list[RunState]:
        return cast(
            "list[RunState]", self._read(lambda conn: self._replay_runs(conn, where, params))
        )

    @staticmethod
    def _replay_runs(conn: apsw.Connection, where: str, params: Sequence[Any]) -> list[RunState]:
        rows = conn.execute(
            "SELECT seq, run_id, action, steps, finalizers, request, created_at, status, "
            f"finished_at, error, response, trace FROM runs {where}",
            params,
        ).fetchall()
        states = []
        for (
            seq,
            run_id,
            action,
            steps,
            fins,
            request,
            created,
            status,
            fin_at,
            err,
            resp,
            trace,
        ) in cast(
            "list[tuple[int, str, str, str, str, str, float, str, float | None, str | None, "
            "str | None, str | None]]",
            rows,
        ):
            record = RunRecord(
                run_id=run_id,
                action=action,
                steps=tuple(json.loads(steps)),
                finalizers=tuple(json.loads(fins)),
                request=json.loads(request),
                created_at=created,
                trace=json.loads(trace) if trace else {},
            )
            state = RunState(record=record, seq=seq, status=RunStatus(status))
            state.finished_at = fin_at
            events = conn.execute(
                "SELECT seq, kind, step, payload, retry_count FROM events "
                "WHERE run_seq = ? ORDER BY seq",
                (seq,),
            ).fetchall()
            for ev_seq, kind, step, payload, retry_count in cast(
                "list[tuple[int, str, str | None, str | None, int]]", events
            ):
                _replay(state, ev_seq, EventKind(kind), step, payload, retry_count)
            if state.status is not RunStatus.ACTIVE:
                if resp is not None:
                    state.response = json.loads(resp)
                if err is not None and state.halt is None:
                    state.halt = json.loads(err)
            states.append(state)
        return states


def migrate_file(path: str, target: SchemaTarget) -> SchemaStatus:
    """Migrate one database file if it is older and close it; its status after (a failure is
    returned, not raised). Module-level so a worker process can run it (``.migrations``)."""
    log = MachineLog(path, target=target)
    try:
        return log.migrate()
    finally:
        log.close()


def _trace_id(trace: str | None) -> str | None:
    """The trace id in a stored W3C trace context (``traceparent`` is version-traceid-...)."""
    if not trace:
        return None
    parts = str(json.loads(trace).get("traceparent", "")).split("-")
    return parts[1] if len(parts) == 4 else None


def _replay(state: RunState, seq: int, kind: EventKind, step, payload, retry_count) -> None:
    state.last_event = seq
    if kind is EventKind.COMPLETE:
        if step not in state.completed:
            state.completed.append(step)
        if payload is not None:
            state.response = json.loads(payload)
    elif kind is EventKind.ERROR:
        state.retries[step] = retry_count
    elif kind is EventKind.CANCEL:
        if state.halt is None:
            state.halt = json.loads(payload) if payload is not None else {"kind": "cancelled"}
    elif kind is EventKind.FINISH:
        pass
