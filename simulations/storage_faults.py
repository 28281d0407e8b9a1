"""Power cuts and read errors under the agent's store, through :mod:`simulations.faulty_vfs`.

:func:`run_power_cuts` runs two agents' cores (``Store`` + ``Replicator``, the objects the agent
runs) in one process: ``a`` on the fault-injecting VFS, ``b`` on the default one. ``a`` commits
local writes (each an insert of fresh keys, acknowledged when ``execute`` returns) and applies
``b``'s versions, broadcast to it with chunks lost (partial versions) and by sync. At seeded
random points the power is cut, either between operations or after a random number of writes
into the next one (that operation is then never acknowledged); ``a`` is closed, its files are
rewritten as the disk would hold them, and it is reopened with a fresh replicator, as an agent
restarting. After every restart:

- the store opens and SQLite's ``integrity_check`` passes;
- its bookkeeping agrees with its data: the in-memory bookie with the tables
  (``agent_checks.bookkeeping_problems``), ``a``'s own versions are exactly ``1..head`` and its
  rows exactly those of those versions, and every version of ``b`` it books whole has all its
  rows while no other version of ``b`` has any;
- with ``synchronous = FULL`` (the agent's) every acknowledged local write is there; with
  ``NORMAL`` (corrosion's) the writes there are a prefix of the acknowledged ones (the last may
  be lost).

At the end the two sync both ways until quiet and must hold equal tables, equal heads, and no
partial or missing version. Returns what was injected and what went wrong (empty: all held).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from corrosion.core.replication import ReplicationConfig, Replicator, SendFrame
from corrosion.core.store import Store

from .agent_checks import bookkeeping_problems
from .faulty_vfs import FaultyVFS
from .rng import Streams

__all__ = ["FaultRun", "run_power_cuts", "run_read_errors", "run_steplog_power_cuts"]

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY NOT NULL, v TEXT);"
ADDR_A, ADDR_B = ("a", 1), ("b", 1)


@dataclass
class FaultRun:
    seed: int
    synchronous: str
    injected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # after a restart
    diverged: list[str] = field(default_factory=list)  # after the final sync
    crashes: int = 0
    acked: int = 0
    lost_acked: int = 0  # acknowledged local writes a crash took away (NORMAL only)


class _Node:
    def __init__(
        self, path: Path, site: bytes, synchronous: str, vfs: str | None, checkpoint: int = 1000
    ) -> None:
        self.store = Store(path, site_id=site, vfs=vfs)
        self.store.conn.execute(f"PRAGMA synchronous = {synchronous}")
        self.store.conn.execute(f"PRAGMA wal_autocheckpoint = {checkpoint}")
        self.store.apply_schema(SCHEMA)
        self.frames: list[bytes] = []  # what the last local write broadcast
        self.rep = Replicator(
            self.store, ReplicationConfig(), random.Random(0), lambda: 1_700_000_000_000
        )

    def rows(self) -> set[str]:
        return {k for (k,) in self.store.conn.execute("SELECT k FROM kv")}


def _deliver(frames: list[bytes], to: _Node, src: tuple[str, int], keep: float, rng) -> None:
    for data in frames:
        if rng.random() < keep:
            to.rep.handle_frame(src, data, 0.0)
    while to.rep.queue:
        to.rep.apply_pending(50)


def _sync(frm: _Node, to: _Node, addr: tuple[str, int]) -> None:
    for frame in frm.rep.serve_sync(to.rep.sync_request()):
        if not to.rep.handle_sync_frame(addr, frame, 0.0):
            break
    while to.rep.queue:
        to.rep.apply_pending(50)


def _write(node: _Node, keys: list[str]) -> int | None:
    stmts = [("INSERT INTO kv (k, v) VALUES (?, ?)", (k, k * 40)) for k in keys]
    _results, commit, effects = node.rep.execute(stmts, 0.0)
    node.frames = [e.data for e in effects if isinstance(e, SendFrame)]
    return None if commit is None else commit.version


def run_power_cuts(
    seed: int, synchronous: str = "NORMAL", steps: int = 60, base: str | None = None
) -> FaultRun:
    streams = Streams(seed)
    rng = streams("storage.ops")
    run = FaultRun(seed, synchronous)
    vfs = FaultyVFS(f"faulty-{seed}-{synchronous}-{id(run)}", streams("storage.disk"))
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        site_a, site_b = streams("site.a").randbytes(16), streams("site.b").randbytes(16)
        # SQLite's default, or checkpoints (which sync the database file) every few commits
        checkpoint = rng.choice((1000, 16))
        a = _Node(Path(tmp) / "a.db", site_a, synchronous, vfs.name, checkpoint)
        b = _Node(Path(tmp) / "b.db", site_b, synchronous, None)
        for x, y, addr in ((a, b, ADDR_B), (b, a, ADDR_A)):
            x.rep.member_up(y.store.actor_id, addr)
        acked: dict[int, list[str]] = {}  # a's versions acknowledged (and not lost) -> keys
        inflight: tuple[int, list[str]] | None = None  # the one a power cut interrupted
        b_versions: dict[int, list[str]] = {}
        n = 0
        try:
            for _step in range(steps):
                if rng.random() < 0.12:
                    vfs.cut_power_after(rng.randint(0, 40))
                op = rng.random()
                n += 1
                if op < 0.45:
                    keys = [f"a{n}.{i}" for i in range(rng.choice((1, 1, 3, 120)))]
                    version = _write(a, keys)
                    if vfs.down and version is not None:
                        inflight = (version, keys)
                    elif version is not None:
                        acked[version] = keys
                        run.acked += 1
                        _deliver(a.frames, b, ADDR_A, 0.8, rng)
                elif op < 0.85:
                    keys = [f"b{n}.{i}" for i in range(rng.choice((1, 2, 150)))]
                    version = _write(b, keys)
                    assert version is not None
                    b_versions[version] = keys
                    _deliver(b.frames, a, ADDR_B, 0.7, rng)
                else:
                    _sync(b, a, ADDR_B)
                if vfs.down or rng.random() < 0.08:
                    vfs.cut_power()
                    a.store.close()
                    vfs.recover()
                    run.crashes += 1
                    try:
                        a = _Node(Path(tmp) / "a.db", site_a, synchronous, vfs.name, checkpoint)
                    except apsw.Error as exc:
                        run.problems.append(f"after crash {run.crashes}: reopening fails: {exc}")
                        return run
                    a.rep.member_up(b.store.actor_id, ADDR_B)
                    try:
                        acked = _check_restart(
                            run, a, b.store.actor_id, acked, inflight, b_versions
                        )
                    except apsw.CorruptError as exc:  # opened, but its pages are not a database
                        run.problems.append(f"after crash {run.crashes}: reading fails: {exc}")
                        return run
                    inflight = None
            vfs.clear_faults()
            run.diverged += _converge(a, b)
        finally:
            _close(run, vfs, a, b)
    return run


def _converge(a: _Node, b: _Node) -> list[str]:
    """Sync both ways until quiet (four rounds are plenty for two nodes); what still differs."""
    for _round in range(4):
        _sync(b, a, ADDR_B)
        _sync(a, b, ADDR_A)
    return _check_converged(a, b)


def _close(run: FaultRun, vfs: FaultyVFS, a: _Node, b: _Node) -> None:
    run.injected = list(vfs.injected)
    a.store.close()
    b.store.close()
    vfs.unregister()


def _check_restart(
    run: FaultRun,
    a: _Node,
    b_actor: bytes,
    acked: dict[int, list[str]],
    inflight: tuple[int, list[str]] | None,
    b_versions: dict[int, list[str]],
) -> dict[int, list[str]]:
    """Check ``a`` just reopened; return its versions that survived (the acknowledged ones, and
    the one the power cut interrupted if it made it to disk)."""
    at = f"after crash {run.crashes}"
    store = a.store
    ok = store.conn.execute("PRAGMA integrity_check").fetchall()
    if ok != [("ok",)]:
        run.problems.append(f"{at}: integrity_check says {ok}")
    run.problems += [f"{at}: {p}" for p in bookkeeping_problems("a", store, {}, available={})]
    rows = a.rows()
    head = store.bookie.head(store.actor_id)
    own = store.bookie.actors.get(store.actor_id)
    held = own.held.ranges() if own is not None else []
    if held != ([(1, head)] if head else []):
        run.problems.append(f"{at}: a books its own versions {held}")
    known = dict(acked)
    if inflight is not None:
        known[inflight[0]] = inflight[1]
    survived = {v: keys for v, keys in known.items() if v <= head}
    for v in range(1, head + 1):
        if v not in survived:
            run.problems.append(f"{at}: a books its version {v}, never committed")
        elif not set(survived[v]) <= rows:
            run.problems.append(f"{at}: a books its version {v} but lacks its rows")
    extra = {k for k in rows if k.startswith("a")} - {k for ks in survived.values() for k in ks}
    if extra:
        run.problems.append(f"{at}: a holds rows of no booked version: {sorted(extra)[:3]}")
    lost = [v for v in acked if v > head]
    if lost:
        run.lost_acked += len(lost)
        if run.synchronous.upper() == "FULL":
            run.problems.append(f"{at}: acknowledged local versions {lost} lost under FULL")
    theirs = store.bookie.actors.get(b_actor)
    for v, keys in b_versions.items():
        whole = theirs is not None and v in theirs.held
        present = set(keys) & rows
        if whole and present != set(keys):
            run.problems.append(f"{at}: a books b:{v} whole but holds {len(present)} of its rows")
        if not whole and present:
            run.problems.append(f"{at}: a holds {len(present)} rows of b:{v}, not booked whole")
    return survived


def _check_converged(a: _Node, b: _Node) -> list[str]:
    out: list[str] = []
    dump = "SELECT k, v FROM kv ORDER BY k"
    if a.store.conn.execute(dump).fetchall() != b.store.conn.execute(dump).fetchall():
        ra, rb = a.rows(), b.rows()
        out.append(
            f"after sync a and b differ: a lacks {sorted(rb - ra)[:3]} ({len(rb - ra)}), "
            f"b lacks {sorted(ra - rb)[:3]} ({len(ra - rb)})"
        )
    names = {a.store.actor_id: "a", b.store.actor_id: "b"}
    for name, node in (("a", a), ("b", b)):
        out += bookkeeping_problems(name, node.store, names)
    for actor, who in names.items():
        ha, hb = a.store.bookie.head(actor), b.store.bookie.head(actor)
        if ha != hb:
            out.append(f"after sync a's head of {who} is {ha}, b's is {hb}")
    return out


def _snapshot(store: Store) -> tuple:
    conn = store.conn
    tables = tuple(
        tuple(sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr))
        for t in (
            "kv",
            "__corro_bookkeeping",
            "__corro_seq_bookkeeping",
            "__corro_buffered_changes",
        )
    )
    bookie = tuple(
        (
            actor,
            tuple(b.held.ranges()),
            tuple((v, tuple(p.seqs.ranges())) for v, p in b.partials.items()),
        )
        for actor, b in sorted(store.bookie.actors.items())
    )
    return tables, bookie


def run_read_errors(seed: int, trials: int = 40, base: str | None = None) -> FaultRun:
    """``a`` (on the faulty VFS, reopened before each trial so its page cache is cold) applies
    ``b``'s versions or commits a local write while reads fail: an operation that fails must
    raise (``apsw.IOError``, or ``StatementError`` for a client's statement) and leave the
    tables and the bookkeeping exactly as they were; in the end sync makes the two equal."""
    streams = Streams(seed)
    rng = streams("storage.ops")
    run = FaultRun(seed, "NORMAL")
    vfs = FaultyVFS(f"faulty-read-{seed}-{id(run)}", streams("storage.disk"))
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        site_a, site_b = streams("site.a").randbytes(16), streams("site.b").randbytes(16)
        path = Path(tmp) / "a.db"
        a = _Node(path, site_a, "NORMAL", vfs.name)
        b = _Node(Path(tmp) / "b.db", site_b, "NORMAL", None)
        b.rep.member_up(a.store.actor_id, ADDR_A)
        try:
            for n in range(trials):
                a.store.close()
                a = _Node(path, site_a, "NORMAL", vfs.name)
                a.rep.member_up(b.store.actor_id, ADDR_B)
                before = _snapshot(a.store)
                fired = len(vfs.injected)
                vfs.fail_reads(after=rng.randint(0, 25), count=rng.choice((1, 1000)))
                failed: Exception | None = None
                try:
                    if rng.random() < 0.6:
                        keys = [f"b{n}.{i}" for i in range(rng.choice((1, 3, 150)))]
                        _write(b, keys)
                        _deliver(b.frames, a, ADDR_B, 0.8, rng)
                    else:
                        _write(a, [f"a{n}.{i}" for i in range(rng.choice((1, 40)))])
                except Exception as exc:  # noqa: BLE001 - what the store raises is checked
                    failed = exc
                finally:
                    vfs.clear_faults()
                if failed is not None:
                    run.crashes += 1  # counts failed operations here
                    if "injected read error" not in str(failed) and "disk I/O" not in str(failed):
                        run.problems.append(f"trial {n}: unclear error {failed!r}")
                    if _snapshot(a.store) != before:
                        run.problems.append(f"trial {n}: a failed operation changed the store")
                elif len(vfs.injected) > fired:
                    run.problems.append(f"trial {n}: a read failed but the operation succeeded")
                run.problems += [
                    f"trial {n}: {p}" for p in bookkeeping_problems("a", a.store, {}, available={})
                ]
            run.diverged += _converge(a, b)
        finally:
            _close(run, vfs, a, b)
    return run


def run_steplog_power_cuts(seed: int, steps: int = 80, base: str | None = None) -> FaultRun:
    """The orchestrator's step log (``orchestrator.steplog.MachineLog``, WAL + FULL) on the
    faulty disk: runs started, steps completed, runs finished, the power cut at seeded points
    (possibly inside a write). After every restart each acknowledged event is there (a step
    reported complete is replayed as completed, so the engine never runs it again), no event
    that was never written appears, and every run's events are numbered 0..n without a gap."""
    from orchestrator.steplog import EventKind, MachineLog, RunRecord, RunStatus

    streams = Streams(seed)
    rng = streams("steplog.ops")
    run = FaultRun(seed, "FULL")
    vfs = FaultyVFS(f"faulty-steplog-{seed}-{id(run)}", streams("steplog.disk"))
    names = ("s1", "s2", "s3", "s4")
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        path = Path(tmp) / "m.sqlite"
        log = MachineLog(path, vfs=vfs.name)
        acked: dict[str, list[str]] = {}  # run -> steps acknowledged complete ("finish": done)
        tried: dict[str, list[str]] = {}  # ... and attempted (acknowledged or cut short)
        try:
            for n in range(steps):
                if rng.random() < 0.15:
                    vfs.cut_power_after(rng.randint(0, 12))
                active = [r for r, done in acked.items() if "finish" not in done]
                run_id = rng.choice(active) if active and rng.random() < 0.8 else f"r{n}"
                done = acked.get(run_id)
                if done is None:
                    record = RunRecord(run_id, "act", names, (), {"n": n}, float(n))
                    tried[run_id] = []
                    log.start_run(record, exclusive=False)
                    event = None
                elif len(done) < len(names):
                    event = names[len(done)]
                    tried[run_id].append(event)
                    log.append(run_id, EventKind.COMPLETE, step=event, at=float(n))
                else:
                    event = "finish"
                    tried[run_id].append(event)
                    log.finish(run_id, RunStatus.SUCCEEDED, error=None, response={}, at=float(n))
                if not vfs.down:
                    acked.setdefault(run_id, [])
                    if event is not None:
                        acked[run_id].append(event)
                if vfs.down or rng.random() < 0.05:
                    vfs.cut_power()
                    log.close()
                    vfs.recover()
                    run.crashes += 1
                    log = MachineLog(path, vfs=vfs.name)
                    acked = _check_steplog(run, log, acked, tried)
        except apsw.Error as exc:
            run.problems.append(f"after crash {run.crashes}: the step log fails: {exc}")
        finally:
            run.injected = list(vfs.injected)
            log.close()
            vfs.unregister()
    return run


def _check_steplog(
    run: FaultRun, log: Any, acked: dict[str, list[str]], tried: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Check the reopened log; return what it holds now (every run, its events after START)."""
    at = f"after crash {run.crashes}"
    held: dict[str, list[str]] = {}
    for run_id in tried:
        state = log.get_run(run_id)
        if state is None:
            if run_id in acked:
                run.problems.append(f"{at}: acknowledged run {run_id} is gone")
            continue
        events = log.events(run_id)
        if [e.seq for e in events] != list(range(len(events))):
            run.problems.append(f"{at}: {run_id}'s events are numbered {[e.seq for e in events]}")
        kinds = [e.step if e.kind == "complete" else str(e.kind) for e in events[1:]]
        if kinds != tried[run_id][: len(kinds)]:
            run.problems.append(f"{at}: {run_id} holds {kinds}, written were {tried[run_id]}")
        if kinds[: len(acked.get(run_id, []))] != acked.get(run_id, []):
            run.problems.append(f"{at}: {run_id} lost acknowledged {acked[run_id]}: {kinds}")
        if state.completed != [k for k in kinds if k != "finish"]:
            run.problems.append(f"{at}: {run_id} replays completed {state.completed}")
        held[run_id] = kinds
        tried[run_id] = list(kinds)
    return held
