"""The sans-IO replication core and the store, without sockets: chunks, partial versions,
gaps, empty versions, sync answers, malformed input."""

from __future__ import annotations

import itertools
import random

import msgpack
import pytest
from agent_helpers import apply_now, commit_now
from hypothesis import given, settings
from hypothesis import strategies as st

from corrosion.core.changeset import (
    Changeset,
    EmptyVersions,
    FrameError,
    chunk_version,
    decode_frame,
    encode,
)
from corrosion.core.ranges import RangeSet
from corrosion.core.replication import (
    ReplicationConfig,
    Replicator,
    SendFrame,
    StartSync,
    SyncTick,
)
from corrosion.core.store import Store

SCHEMA = "CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY, body TEXT, n INTEGER DEFAULT 0)"


def store(tmp_path, name: str) -> Store:
    s = Store(tmp_path / f"{name}.db")
    s.apply_schema(SCHEMA)
    return s


def replicator(s: Store, seed: int = 1, **cfg) -> Replicator:
    return Replicator(s, ReplicationConfig(**cfg), random.Random(seed), lambda: 1_700_000_000_000)


def table(s: Store) -> list[tuple]:
    return s.conn.execute("SELECT * FROM t ORDER BY id").fetchall()


def big_commit(s: Store, n: int = 300):
    _, commit = commit_now(
        s, [("INSERT INTO t (id, body) VALUES (?, ?)", (i, "x" * 100)) for i in range(n)], ts=1
    )
    return commit


def test_chunks_buffer_until_complete_even_across_a_restart(tmp_path):
    a, b = store(tmp_path, "a"), store(tmp_path, "b")
    commit = big_commit(a)
    chunks = chunk_version(
        a.actor_id,
        commit.version,
        commit.changes,
        commit.last_seq,
        1,
        commit.db_version,
        max_bytes=2048,
    )
    assert len(chunks) > 4
    assert chunks[0].seqs[0] == 0 and chunks[-1].seqs[1] == commit.last_seq
    assert all(x.seqs[1] + 1 == y.seqs[0] for x, y in itertools.pairwise(chunks))
    order = list(reversed(chunks))
    result = apply_now(b, order[:-1] + order[:2])  # all but one chunk, plus duplicates
    assert result.buffered == len(chunks) - 1 and result.duplicates == 2
    assert table(b) == []
    assert b.bookie.get(a.actor_id).partials[1].seqs.ranges() == [
        (chunks[1].seqs[0], commit.last_seq)
    ]
    path = b.path
    b.close()
    b = Store(path)  # a crash here must lose nothing
    assert list(b.bookie.get(a.actor_id).partials) == [1]
    result = apply_now(b, [order[-1]])
    assert result.applied == [(a.actor_id, 1)]
    assert table(b) == table(a)
    assert b.conn.execute("SELECT count(*) FROM __corro_buffered_changes").fetchone() == (0,)
    assert b.bookie.get(a.actor_id).gaps() == RangeSet()


def test_versions_out_of_order_leave_gaps_until_filled(tmp_path):
    a, b = store(tmp_path, "a"), store(tmp_path, "b")
    commits = []
    for i in range(4):
        commits.append(commit_now(a, [("INSERT INTO t (id) VALUES (?)", (i,))], ts=i)[1])
    items = [next(iter(a.serve(a.actor_id, RangeSet([(c.version, c.version)])))) for c in commits]
    apply_now(b, [items[3]])
    assert b.bookie.get(a.actor_id).gaps() == RangeSet([(1, 3)])
    assert b.conn.execute('SELECT start, "end" FROM __corro_bookkeeping_gaps').fetchall() == [
        (1, 3)
    ]
    apply_now(b, [items[1], items[0]])
    assert b.bookie.gap_count() == 2 - 1 + 0  # only version 3 missing now
    apply_now(b, [items[2]])
    assert b.bookie.gap_count() == 0 and table(b) == table(a)
    assert b.conn.execute("SELECT count(*) FROM __corro_bookkeeping_gaps").fetchone() == (0,)


def test_superseded_versions_are_served_empty(tmp_path):
    a, b = store(tmp_path, "a"), store(tmp_path, "b")
    commit_now(a, [("INSERT INTO t (id, body) VALUES (1, 'old')", ())], ts=1)
    commit_now(a, [("UPDATE t SET body = 'new', n = 1 WHERE id = 1", ())], ts=2)
    served = list(a.serve(a.actor_id, RangeSet([(1, 2)])))
    assert isinstance(served[-1], EmptyVersions) and served[-1].versions == ((1, 1),)
    assert [c.version for c in served if isinstance(c, Changeset)] == [2]
    apply_now(b, served)
    assert table(b) == [(1, "new", 1)]
    assert b.bookie.get(a.actor_id).held == RangeSet([(1, 2)])


def test_sync_alone_converges_two_replicators(tmp_path):
    sa, sb = store(tmp_path, "a"), store(tmp_path, "b")
    ra, rb = replicator(sa, broadcast=False), replicator(sb, broadcast=False)
    for i in range(30):
        ra.execute([("INSERT INTO t (id, body) VALUES (?, ?)", (i, f"a{i}"))], now=i)
        rb.execute([("INSERT INTO t (id, body) VALUES (?, ?)", (100 + i, f"b{i}"))], now=i)
    rb.execute([("UPDATE t SET n = n + 1", ())], now=40)

    def sync(client: Replicator, server: Replicator) -> int:
        frames = list(server.serve_sync(client.sync_request()))
        for f in frames:
            assert client.handle_sync_frame(("x", 1), f, 0.0) or f is frames[-1]
        client.apply_pending()
        return len(frames)

    sync(rb, ra)
    sync(ra, rb)
    assert table(sa) == table(sb) and len(table(sa)) == 60
    assert sync(ra, rb) == 1  # nothing left but the done frame
    assert sa.bookie.gap_count() == sb.bookie.gap_count() == 0


def test_broadcast_relays_once_and_drops_duplicates(tmp_path):
    sa, sb = store(tmp_path, "a"), store(tmp_path, "b")
    ra, rb = replicator(sa), replicator(sb)
    peers = [(bytes([i]) * 16, (f"10.0.0.{i}", 9000)) for i in range(1, 6)]
    for actor, addr in peers:
        ra.member_up(actor, addr)
        rb.member_up(actor, addr)
    rb.member_up(sa.actor_id, ("a", 1))
    _, _commit, effects = ra.execute([("INSERT INTO t (id) VALUES (1)", ())], now=0.0)
    sends = [e for e in effects if isinstance(e, SendFrame)]
    assert len({e.addr for e in sends}) == 3  # fanout
    frame = sends[0].data
    relay = rb.handle_frame(("a", 1), frame, now=0.1)
    relayed_to = {e.addr for e in relay if isinstance(e, SendFrame)}
    assert len(relayed_to) == 3 and ("a", 1) not in relayed_to
    assert rb.handle_frame(("a", 1), frame, now=0.2) == []  # queued already: no second relay
    rb.apply_pending()
    assert rb.handle_frame(("a", 1), frame, now=0.3) == []  # held: dropped
    assert rb.stats.duplicates >= 2 and table(sb) == [(1, None, 0)]


def test_other_cluster_and_malformed_sync_requests_are_rejected(tmp_path):
    sa, sb = store(tmp_path, "a"), store(tmp_path, "b")
    ra, rb = replicator(sa, cluster_id=1), replicator(sb, cluster_id=2)
    frames = list(ra.serve_sync(rb.sync_request()))
    assert len(frames) == 1 and decode_frame(frames[0])[1] == ["different cluster"]
    assert ra.stats.other_cluster == 1
    assert next(iter(ra.serve_sync(b"\x93garbage"))) and ra.stats.malformed == 1
    assert ra.check_hello(rb.hello("sync")) is None


def test_sync_ticks_back_off_and_pick_idle_peers(tmp_path):
    r = replicator(store(tmp_path, "a"), min_sync_backoff=1.0, max_sync_backoff=4.0)
    for i in range(5):
        r.member_up(bytes([i + 1]) * 16, ("h", i))
    start = next(e for e in r.start(0.0) if isinstance(e.timer, SyncTick))
    effects = r.handle_timer(start.timer, 1.0)
    assert len([e for e in effects if isinstance(e, StartSync)]) == 3
    # in-flight syncs are not doubled; the interval doubles up to the max
    times = []
    now = 1.0
    for _ in range(4):
        effects = r.handle_timer(SyncTick(1), now)
        timer = next(e for e in effects if hasattr(e, "timer") and isinstance(e.timer, SyncTick))
        times.append(timer.at - now)
        now = timer.at
    assert all(t <= 4.0 * 1.3 for t in times) and times[-1] >= 4.0 * 0.7
    assert len(r._syncing) == 3


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_frames_never_raise(tmp_path_factory, data):
    r = replicator(store(tmp_path_factory.mktemp("g"), "g"))
    r.handle_frame(None, data, 0.0)
    r.handle_sync_frame(("x", 1), data, 0.0)
    list(r.serve_sync(data))
    r.check_hello(data)
    r.apply_pending()


def test_bad_changeset_is_isolated_from_its_batch(tmp_path):
    a, b = store(tmp_path, "a"), store(tmp_path, "b")
    good = list(a.serve(a.actor_id, RangeSet([(1, 1)])))
    commit_now(a, [("INSERT INTO t (id) VALUES (1)", ())], ts=1)
    good = list(a.serve(a.actor_id, RangeSet([(1, 1)])))
    # a malformed pk (an unknown table is not bad data: it is kept until its schema arrives)
    bad = Changeset(b"\x07" * 16, 1, (good[0].changes[0]._replace(pk=b"\xff"),), (0, 0), 0, 1, 1)
    result = apply_now(b, [bad, *good])
    assert result.rejected and result.rejected[0][0] == b"\x07" * 16
    assert result.applied == [(a.actor_id, 1)] and table(b) == [(1, None, 0)]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 8)), max_size=40))
def test_rangeset_matches_a_set(ops):
    model: set[int] = set()
    r = RangeSet()
    for add, start, length in ops:
        end = start + length
        if add:
            r.add(start, end)
            model |= set(range(start, end + 1))
        else:
            r.remove(start, end)
            model -= set(range(start, end + 1))
    assert set(r.values()) == model and len(r) == len(model)
    assert all(x[1] + 1 < y[0] for x, y in zip(r.ranges(), r.ranges()[1:], strict=False))
    assert r.max() == (max(model) if model else 0)


def test_changeset_codec_roundtrip_and_validation(tmp_path):
    a = store(tmp_path, "a")
    commit = big_commit(a, 3)
    (cs,) = chunk_version(a.actor_id, 1, commit.changes, commit.last_seq, 7, 1)
    assert decode_frame(encode(cs))[1] == cs
    with pytest.raises(ValueError):
        decode_frame(encode(cs)[:-3])


def test_changeset_decoding_checks_every_field():
    """The decoder's fast path (tuples) and the generic one (lists: any msgpack encoder may
    write an array's length in a longer form) accept the same frames and refuse each field
    that is wrong, with FrameError."""
    actor = b"\x01" * 16
    row = ["t", b"\x01\x09\x01", "body", "x", 1, None, 1, 0]
    frame = [1, 1, actor, 3, 0, 0, 0, 5, 7, [row]]

    def long_form(fields: list) -> bytes:  # the array's length written as 16 bits
        head = b"\xdc" + len(fields).to_bytes(2, "big")
        return head + b"".join(msgpack.packb(f, use_bin_type=True) for f in fields)

    expected = Changeset(actor, 3, (("t", b"\x01\x09\x01", "body", "x", 1, 7, actor, 1, 0),),
                         (0, 0), 0, 5, 7)  # fmt: skip
    for data in (msgpack.packb(frame, use_bin_type=True), long_form(frame)):
        kind, cs = decode_frame(data)
        assert kind == 1 and cs == expected and type(cs.changes[0]) is tuple  # crdt.ChangeRow
    bad_rows = [
        row[:7],  # seven fields
        ["t", "pk", *row[2:]],  # pk not a blob
        [*row[:3], [1], *row[4:]],  # a value that is an array
        [*row[:4], "1", *row[5:]],  # col_version not an integer
        [*row[:4], True, *row[5:]],  # booleans are not integers
        [*row[:5], b"\x02" * 17, *row[6:]],  # site id too long
        [*row[:7], 1],  # seq past the chunk's range
        "not a change",
        dict.fromkeys(["t", b"\x01", "body", 2.5, 1, None, 2, 0]),  # a map whose keys would do
    ]
    bad_frames = [[*frame[:9], [bad]] for bad in bad_rows]
    bad_frames += [
        [*frame[:2], b"short", *frame[3:]],  # actor id not 16 bytes
        [*frame[:3], 0, *frame[4:]],  # version 0
        [*frame[:4], 1, 0, *frame[6:]],  # seq start after seq end
        [*frame[:7], -1, *frame[8:]],  # negative ts
        [*frame[:9], "rows"],  # changes not an array
        frame[:9],  # nine fields
    ]
    for bad in bad_frames:
        for data in (msgpack.packb(bad, use_bin_type=True), long_form(bad)):
            with pytest.raises(FrameError):
                decode_frame(data)


def test_digests_repair_a_node_the_broadcast_missed(tmp_path):
    """A node that never got a broadcast learns from a digest that it lacks a head, and syncs
    with the sender once the grace period has passed (not before: the broadcast may be late)."""
    sa, sb = store(tmp_path, "a"), store(tmp_path, "b")
    ra, rb = replicator(sa, digest_grace=0.3), replicator(sb, digest_grace=0.3)
    ra.member_up(sb.actor_id, ("b", 1))
    rb.member_up(sa.actor_id, ("a", 1))
    ra.execute([("INSERT INTO t (id) VALUES (1)", ())], now=0.0)  # the broadcast is lost
    tick = next(e for e in ra.start(0.0) if not isinstance(e.timer, SyncTick)).timer
    digest = [e for e in ra.handle_timer(tick, 0.2) if isinstance(e, SendFrame)]
    assert len(digest) == 1 and digest[0].addr == ("b", 1)
    assert rb.handle_frame(("a", 1), digest[0].data, now=0.25) == []
    early = rb.handle_timer(tick, 0.4)  # within the grace period: wait for the broadcast
    assert not [e for e in early if isinstance(e, StartSync)]
    late = [e for e in rb.handle_timer(tick, 0.7) if isinstance(e, StartSync)]
    assert [e.addr for e in late] == [("a", 1)]
    for frame in ra.serve_sync(late[0].request):
        rb.handle_sync_frame(("a", 1), frame, 0.8)
    rb.sync_finished(("a", 1))
    rb.apply_pending()
    assert table(sb) == [(1, None, 0)] and rb.stats.digest_syncs == 1
    assert not [e for e in rb.handle_timer(tick, 2.0) if isinstance(e, StartSync)]
