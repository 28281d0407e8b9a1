"""Per-machine step-log databases: pragmas, schema versions and migration, append/scan rules,
rollback on bad input, concurrent starts, the machines directory (lock, LRU, archive), and
durability of acknowledged appends under SIGKILL."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import apsw
import pytest

from orchestrator import steplog_schema
from orchestrator.archive import DirectoryArchive, MemoryArchive
from orchestrator.errors import (
    AlreadyRunningError,
    MachineExistsError,
    StoreLockedError,
    UnknownMachineError,
    UnknownRunError,
)
from orchestrator.steplog import EventKind, MachineLog, RunRecord, RunStatus
from orchestrator.store import MachineStore

ROOT = Path(__file__).resolve().parents[2]


def record(run_id="r1", action="start", steps=("a", "b")) -> RunRecord:
    return RunRecord(run_id, action, tuple(steps), ("fin",), {"x": 1}, 100.0)


def test_pragmas_and_schema_version(tmp_path):
    log = MachineLog(tmp_path / "m.sqlite")
    log.open()
    conn = apsw.Connection(str(tmp_path / "m.sqlite"))
    assert conn.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchall()[0][0] == steplog_schema.SCHEMA_VERSION
    assert log._db().execute("PRAGMA synchronous").fetchall()[0][0] == 2  # FULL
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "events", "machine"} <= tables
    conn.close()
    log.close()


def test_database_from_a_newer_release_is_refused(tmp_path):
    path = tmp_path / "m.sqlite"
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {steplog_schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(steplog_schema.SchemaTooNewError):
        MachineLog(path).open()
    conn = apsw.Connection(str(path))
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchall()[0][0] == 0
    conn.close()


OLD_SCHEMA = """
CREATE TABLE runs (
    seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, action TEXT NOT NULL, steps TEXT NOT NULL,
    finalizers TEXT NOT NULL, request TEXT NOT NULL, created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'active', finished_at REAL, error TEXT
);
CREATE TABLE events (
    run_seq INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, step TEXT,
    payload TEXT, retry_count INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL,
    PRIMARY KEY (run_seq, seq)
);
"""


def test_database_of_an_older_release_is_migrated_keeping_its_runs(tmp_path):
    """A database from before ``runs.response``, the ``machine`` table and the indexes existed
    (user_version 0) gains them through the schema manager's diff and keeps its rows."""
    path = tmp_path / "m.sqlite"
    conn = apsw.Connection(str(path))
    conn.execute(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO runs (run_id, action, steps, finalizers, request, created_at) "
        "VALUES ('r1', 'start', '[\"a\"]', '[]', '{}', 1.0)"
    )
    conn.execute("INSERT INTO events VALUES (1, 0, 'start', NULL, NULL, 0, 1.0)")
    conn.close()
    log = MachineLog(path)
    (run,) = log.active_runs()
    assert run.run_id == "r1" and run.record.steps == ("a",)
    db = log._db()
    assert "response" in [r[1] for r in db.execute("PRAGMA table_info(runs)")]
    assert db.execute("PRAGMA user_version").fetchall()[0][0] == steplog_schema.SCHEMA_VERSION
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"runs_run_id", "runs_status_action"} <= indexes
    log.start_run(record("r2"), exclusive=False, doc={"id": "m"})
    assert log.read_doc() == {"id": "m"}
    log.close()


def test_a_refused_migration_leaves_the_database_as_it_was(tmp_path):
    """A live column the schema no longer has would be dropped: refused, nothing changes."""
    path = tmp_path / "m.sqlite"
    conn = apsw.Connection(str(path))
    conn.execute(OLD_SCHEMA.replace("error TEXT", "error TEXT, legacy TEXT"))
    conn.close()
    log = MachineLog(path)
    with pytest.raises(steplog_schema.MigrationFailedError, match="legacy"):
        log.open()
    assert log.status is not None and log.status.state == steplog_schema.FAILED
    log.close()
    conn = apsw.Connection(str(path))
    assert conn.execute("PRAGMA user_version").fetchall()[0][0] == 0
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"runs", "events"}
    conn.close()


def test_reopening_applies_nothing(tmp_path):
    log = MachineLog(tmp_path / "m.sqlite")
    log.start_run(record())
    log.close()
    before = apsw.Connection(str(tmp_path / "m.sqlite"))
    schema = before.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    before.close()
    log = MachineLog(tmp_path / "m.sqlite")
    assert [r.run_id for r in log.active_runs()] == ["r1"]
    assert log._db().execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    log.close()


def test_append_and_replay(tmp_path):
    log = MachineLog(tmp_path / "m.sqlite")
    seq = log.start_run(record(), doc={"id": "m", "state": "created"})
    assert seq == 1 and log.read_doc() == {"id": "m", "state": "created"}
    log.append("r1", EventKind.ERROR, step="a", payload={"message": "x"}, retry_count=3, at=1)
    log.append("r1", EventKind.COMPLETE, step="a", payload={"k": 1}, at=2)
    (state,) = log.active_runs()
    assert state.completed == ["a"] and state.response == {"k": 1} and state.retries == {"a": 3}
    log.append("r1", EventKind.CANCEL, step="b", payload={"kind": "abort", "message": "m"}, at=3)
    log.append("r1", EventKind.COMPLETE, step="finally:fin", payload={"k": 1}, at=4)
    log.finish("r1", RunStatus.FAILED, error={"kind": "abort"}, response={"k": 1}, at=5)
    assert log.active_runs() == []
    run = log.get_run("r1")
    assert run.status is RunStatus.FAILED and run.halt["kind"] == "abort"
    assert [e.seq for e in log.events("r1")] == list(range(6))
    assert [e.kind for e in log.events("r1")] == [
        "start", "error", "complete", "cancel", "complete", "finish",
    ]  # fmt: skip


def test_appends_are_refused_cleanly(tmp_path):
    log = MachineLog(tmp_path / "m.sqlite")
    log.start_run(record())
    with pytest.raises(UnknownRunError):
        log.append("nope", EventKind.COMPLETE, step="a", at=1)
    with pytest.raises(ValueError, match="complete/error/cancel"):
        log.append("r1", EventKind.FINISH, step=None, at=1)
    with pytest.raises(TypeError):  # not JSON: nothing written
        log.append("r1", EventKind.COMPLETE, step="a", payload={"x": object()}, at=1)
    with pytest.raises(AlreadyRunningError) as err:
        log.start_run(record("r2"), doc={"id": "m"})
    assert err.value.run_id == "r1"
    assert log.read_doc() is None  # the refused START's doc did not land
    log.finish("r1", RunStatus.SUCCEEDED, error=None, response={}, at=2)
    with pytest.raises(ValueError, match="closed"):
        log.append("r1", EventKind.COMPLETE, step="a", at=3)
    assert [e.kind for e in log.events("r1")] == ["start", "finish"]
    assert log.get_run("r2") is None
    log.start_run(record("r2"))  # the slot is free after FINISH
    log.start_run(record("r3"), exclusive=False)  # queued behind it
    assert [r.run_id for r in log.active_runs()] == ["r2", "r3"]
    assert [r.run_id for r in log.history(2)] == ["r3", "r2"]
    log.close()


def test_concurrent_exclusive_starts_have_one_winner(tmp_path):
    path = tmp_path / "m.sqlite"
    MachineLog(path).open()
    wins, losses = [], []
    barrier = threading.Barrier(8)

    def contender(i: int) -> None:
        log = MachineLog(path)  # separate connections, as separate processes would have
        barrier.wait()
        try:
            log.start_run(record(f"r{i}"))
            wins.append(i)
        except AlreadyRunningError:
            losses.append(i)
        finally:
            log.close()

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7


def test_store_lock_lru_and_ids(tmp_path):
    store = MachineStore(tmp_path / "ms", max_open=2)
    with pytest.raises(StoreLockedError):
        MachineStore(tmp_path / "ms")
    for i in range(5):
        store.create(f"m{i}").start_run(record(f"r{i}"))
    assert sum(log.is_open for log in store._logs.values()) <= 2
    for i in range(5):  # evicted logs reopen transparently
        assert [r.run_id for r in store.log(f"m{i}").active_runs()] == [f"r{i}"]
    assert store.machine_ids() == [f"m{i}" for i in range(5)]
    with pytest.raises(MachineExistsError):
        store.create("m0")
    with pytest.raises(UnknownMachineError):
        store.log("m9")
    for bad in ("../x", "", "A", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            store.create(bad)
    store.close()
    MachineStore(tmp_path / "ms").close()  # the lock went with close()


def test_archive_roundtrip(tmp_path):
    archive = DirectoryArchive(tmp_path / "archive")
    store = MachineStore(tmp_path / "ms", archive)
    log = store.create("m1")
    log.start_run(record(), doc={"id": "m1", "state": "destroyed"})
    key = store.archive("m1")
    assert key == "m1.sqlite.gz" and archive.list_keys() == [key]
    assert store.machine_ids() == [] and not list((tmp_path / "ms").glob("m1.sqlite*"))
    assert gzip.decompress(archive.get(key))[:16] == b"SQLite format 3\x00"
    restored = store.restore_archived("m1", tmp_path / "back.sqlite")
    assert restored.read_doc()["state"] == "destroyed"
    assert [r.run_id for r in restored.active_runs()] == ["r1"]
    restored.close()
    with pytest.raises(UnknownMachineError):
        store.archive("m1")
    with pytest.raises(ValueError):
        archive.put("../evil", b"x")
    mem = MemoryArchive()
    mem.put("a.gz", b"1")
    assert mem.get("a.gz") == b"1" and mem.list_keys() == ["a.gz"]
    store.close()


WRITER = textwrap.dedent(
    """
    import sys
    from orchestrator.steplog import EventKind, MachineLog, RunRecord
    log = MachineLog(sys.argv[1])
    if not log.active_runs():
        log.start_run(RunRecord("r", "op", ("s",), (), {}, 0.0))
    i = len(log.events("r"))
    while True:
        log.append("r", EventKind.COMPLETE, step=f"s{i}", payload={"i": i}, at=float(i))
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
        i += 1
    """
)


def test_acknowledged_appends_survive_sigkill(tmp_path):
    """A writer prints each append after it returned; SIGKILL at random moments never loses an
    acknowledged append, and the log stays gap-free and intact."""
    path = tmp_path / "m.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env
        )
        acked = -1
        for _ in range(30 + 7 * round_):
            line = proc.stdout.readline()
            if not line:
                break
            acked = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        log = MachineLog(path)
        events = log.events("r")
        assert [e.seq for e in events] == list(range(len(events)))
        assert events[-1].seq >= acked
        assert log._db().execute("PRAGMA integrity_check").fetchall()[0][0] == "ok"
        log.close()
