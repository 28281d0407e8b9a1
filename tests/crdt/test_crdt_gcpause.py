"""Bulk reads and merges pause the cyclic GC and always restore the state they found."""

import gc

import pytest

import crdt
from crdt.gcpause import gc_paused


def db():
    conn = crdt.connect()
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b)")
    conn.execute("SELECT crsql_as_crr('t')")
    return conn


def test_pause_restores_an_enabled_collector_even_on_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        src = db()
        src.execute("INSERT INTO t VALUES (1, 'x')")
        changes = crdt.changes_since(src, 0)
        crdt.merge(db(), changes)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_merges_and_reads_leave_the_collector_on():
    src = db()
    src.execute("INSERT INTO t VALUES (1, 'x')")
    dst = db()
    crdt.merge(dst, crdt.changes_since(src, 0))
    with dst:
        crdt.merge_changesets(dst, [crdt.changes_since(src, 0)])
    with pytest.raises(crdt.MergeError):
        crdt.merge(dst, [("nope", b"", "b", 1, 1, 1, None, 1, 0)])
    assert gc.isenabled()
    assert dst.execute("SELECT * FROM t").fetchall() == [(1, "x")]
