"""The tombstone GC watermark (corrosion.core.tombstones.Watermark): which cut it lets the reaper
collect below, as members report, go down, leave, or are not known yet; and the floors a sync
answer carries to a node that joins after a collection."""

from __future__ import annotations

import random

from agent_helpers import apply_now, commit_now

from corrosion.core.bookie import Bookie
from corrosion.core.changeset import chunk_version
from corrosion.core.replication import ReplicationConfig, Replicator
from corrosion.core.store import Store
from corrosion.core.tombstones import Watermark, contiguous_from_state, reap

A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


def bookie(**heads: int) -> Bookie:
    out = Bookie()
    for name, head in heads.items():
        out.get(name.encode() * 16).held.add(1, head)
    return out


def state(**heads: int) -> dict:
    return {
        name.encode() * 16: {"head": h, "gaps": [], "partials": {}} for name, h in heads.items()
    }


def test_contiguous_head_stops_below_the_first_gap_or_partial():
    assert contiguous_from_state({"head": 9, "gaps": [[4, 5]], "partials": {}}) == 3
    assert contiguous_from_state({"head": 9, "gaps": [], "partials": {7: [[0, 1]]}}) == 6
    assert contiguous_from_state({"head": 9}) == 9


def test_the_cut_is_stable_once_everyone_holds_what_everyone_had_written():
    w = Watermark(A)
    w.member_up(B)
    assert w.advance(bookie(a=5, b=3)) is None  # b has not reported
    w.report(B, state(a=4, b=3))
    assert w.advance(bookie(a=5, b=3)) is None  # first record: cut {a: 4, b: 3}, own {a: 5, b: 3}
    assert w.advance(bookie(a=5, b=3)) is None  # b holds a only up to 4 < 5
    w.report(B, state(a=5, b=3))
    assert w.advance(bookie(a=5, b=3)) == {A: 4, B: 3}  # the first record's cut


def test_a_member_that_is_down_holds_the_cut_back_and_one_that_left_does_not():
    w = Watermark(A)
    w.member_up(B)
    w.member_up(C)
    w.report(B, state(a=2, b=1, c=1))
    w.report(C, state(a=1, b=1, c=1))
    w.member_down(C, left=False)
    for _ in range(3):
        cut = w.advance(bookie(a=9, b=1, c=1))
    assert cut is None  # c is down: its last report keeps the cut of a at 1
    w.member_down(C, left=True)
    assert w.advance(bookie(a=9, b=1, c=1)) is None  # the member set changed: start again
    w.report(B, state(a=9, b=1, c=1))
    assert w.advance(bookie(a=9, b=1, c=1)) == {A: 2, B: 1, C: 1}


def test_an_actor_whose_versions_anyone_holds_counts_before_swim_names_it():
    w = Watermark(A)
    w.member_up(B)
    w.report(B, state(a=1, b=1, c=4))  # c wrote, and b has it; SWIM has not told us of c
    assert w.unreported(bookie(a=1)) == [C]
    for _ in range(3):
        assert w.advance(bookie(a=1, b=1, c=4)) is None
    w.report(C, state(a=1, b=1, c=4))
    w.advance(bookie(a=1, b=1, c=4))
    assert w.advance(bookie(a=1, b=1, c=4)) == {A: 1, B: 1, C: 4}


def test_a_node_joining_after_a_collection_hears_the_floor_and_reuses_keys_above_it(tmp_path):
    """a collected the delete, b has not yet; j joins and syncs from a, which holds nothing of
    the key any more. j's insert of the key must still beat b's tombstone: a's floor comes with
    the end of its sync answer."""

    def node(name):
        s = Store(tmp_path / f"{name}.db")
        s.apply_schema("CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY, body TEXT)")
        return s, Replicator(s, ReplicationConfig(), random.Random(1), lambda: 1_700_000_000_000)

    (a, ra), (b, _rb), (j, rj) = node("a"), node("b"), node("j")
    for sql in ("INSERT INTO t VALUES (1, 'x')", "DELETE FROM t"):
        _, commit = commit_now(a, [(sql, ())], ts=1)
        apply_now(b, chunk_version(a.actor_id, commit.version, commit.changes, 0, 1, 1))
    assert reap(a, {a.actor_id: 2}, 10).keys == {"t": 1}
    a.tombstone_floors = reap(a, {a.actor_id: 2}, 10).floors
    assert a.tombstone_floors == {"t": 2}

    for frame in ra.serve_sync(rj.sync_request()):
        if not rj.handle_sync_frame(("a", 1), frame, 0.0):
            break
    rj.apply_pending()
    assert j.conn.execute("SELECT count(*) FROM t__crsql_clock").fetchone() == (0,)
    assert j.tombstone_floors == {"t": 2}

    _, commit = commit_now(j, [("INSERT INTO t VALUES (1, 'again')", ())], ts=2)
    assert {c.cl for c in commit.changes} == {3}
    chunks = chunk_version(j.actor_id, commit.version, commit.changes, commit.last_seq, 2, 1)
    for s in (a, b):
        apply_now(s, chunks)
        assert s.conn.execute("SELECT * FROM t").fetchall() == [(1, "again")]


def test_an_actor_held_only_past_a_gap_still_counts():
    w = Watermark(A)
    w.member_up(B)
    w.report(B, {**state(a=1, b=1), C: {"head": 5, "gaps": [[1, 2]], "partials": {}}})
    assert w.unreported(bookie(a=1)) == [C]
