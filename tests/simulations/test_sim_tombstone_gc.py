"""Tombstone GC in the simulator (the agent's replication core and reaper pass, real SQLite):
with the reaper on, a cluster under partitions, crashes and loss, deleting and re-inserting the
same keys, ends with the same tables as with it off, and collects every tombstone once quiet; a
change older than a delete cannot bring the row back after the delete's metadata is gone."""

from __future__ import annotations

import random

import pytest

from corrosion.core.changeset import chunk_version, encode
from simulations import LinkModel, run_liveness
from simulations.agent_core import agent_of, agent_world
from simulations.strategies import BASE_LINK
from simulations.tombstone_gc import REAPER, ReaperCore, ReaperTotals, tombstone_gc

UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"
DELETE = "DELETE FROM kv WHERE k = ?"
UPDATE = "UPDATE kv SET v = ? WHERE k = ?"
TOMBSTONES = "SELECT count(*) FROM kv__crsql_clock WHERE col_name = '-1' AND col_version % 2 = 0"


def tables(world) -> list[list[tuple]]:
    return [list(agent_of(n).conn.execute("SELECT * FROM kv ORDER BY k")) for n in world.nodes]


def tombstones(world) -> list[int]:
    return [agent_of(n).conn.execute(TOMBSTONES).fetchone()[0] for n in world.nodes]


def churn(world, seed: int, writes: int = 60) -> None:
    """Upserts, updates and deletes of a few keys (so each is deleted and inserted again, often),
    with a partition, a crash and a restart along the way. A key is inserted only by its owner
    node, the others update or delete it: an insert of a key its writer never saw, racing a
    delete, is the one case the floor decides differently (docs/agent.md, "Tombstone GC";
    crdt's test_the_floor_lifts_every_new_key_so_a_concurrent_delete_of_an_unseen_key_loses).
    With any node inserting any key, 1 seed in 40 (10) ends with such a key alive with GC on."""
    rng = random.Random(seed)
    n = len(world.nodes)
    for i in range(writes):
        node = rng.randrange(n)
        core = agent_of(world.nodes[node])
        if core is not None:
            k = rng.randrange(6)
            key = f"k{k}"
            if rng.random() < 0.4:
                core.execute([(DELETE, (key,))], world.now)
            elif k % n == node:
                core.execute([(UPSERT, (key, f"v{i}"))], world.now)
            else:
                core.execute([(UPDATE, (f"v{i}", key))], world.now)
        world.run_for(rng.uniform(0.5, 3.0))
        if i == writes // 4:
            world.partition([world.nodes[: n // 2], world.nodes[n // 2 :]])
        if i == writes // 3:
            world.crash(world.nodes[1])
        if i == writes // 2:
            world.restart(world.nodes[1])
        if i == 2 * writes // 3:
            world.heal_all(LinkModel(BASE_LINK.delay, loss=0.05))


def run(seed: int, gc: bool):
    totals = ReaperTotals()
    extra = [tombstone_gc(totals, interval=5.0, batch=3)] if gc else []
    world = agent_world(seed, 3 + seed % 3, link=LinkModel(BASE_LINK.delay, loss=0.05), extra=extra)
    world.run_until(2.0)
    churn(world, seed)
    run_liveness(world, link=BASE_LINK)
    world.check()
    return world, totals


@pytest.mark.parametrize("seed", range(6))
def test_with_the_reaper_on_the_tables_are_those_it_leaves_off(seed):
    off, _ = run(seed, gc=False)
    try:
        expected = tables(off)
        assert all(t == expected[0] for t in expected)
        assert sum(tombstones(off)) > 0  # the workload leaves deleted rows
    finally:
        off.close()
    on, totals = run(seed, gc=True)
    try:
        assert tables(on) == expected
        # quiet now: every member reports, the watermark passes every delete, all is collected
        assert on.run_until_true(lambda: sum(tombstones(on)) == 0, 600.0, 5.0), tombstones(on)
        assert sum(totals.reaped.values()) > 0
        assert tables(on) == expected
        on.check()  # databases still equal, clocks included
    finally:
        on.close()


def test_a_late_change_cannot_resurrect_a_reaped_row():
    """C writes the row while cut off; B deletes it meanwhile. C is down, not gone: nobody
    collects the delete until C is back and has reported. Then C's write loses everywhere, the
    delete is collected everywhere, a replay of C's old frame is dropped, and the key is free."""
    totals = ReaperTotals()
    world = agent_world(7, 3, extra=[tombstone_gc(totals, interval=2.0)])
    try:
        world.run_until(2.0)
        a, b, c = (agent_of(n) for n in world.nodes)
        a.execute([(UPSERT, ("k", "first"))], world.now)
        assert world.run_until_true(
            lambda: all(t == [("k", "first", 0)] for t in tables(world)), 30
        )

        world.partition([world.nodes[:2], world.nodes[2:]])
        _r, commit, _effects = c.replicator.execute([(UPSERT, ("k", "late"))], world.now)
        assert commit is not None
        late_frames = [
            encode(ch)
            for ch in chunk_version(
                c.store.actor_id, commit.version, commit.changes, commit.last_seq, commit.ts,
                commit.db_version,
            )
        ]  # fmt: skip
        b.execute([(DELETE, ("k",))], world.now)
        world.run_for(120.0)  # many reaper passes, C unreachable all along
        assert tombstones(world)[:2] == [1, 1]  # kept: C has not reported the delete

        run_liveness(world, link=BASE_LINK)
        world.check()
        assert tables(world) == [[], [], []]  # C's write lost to the delete everywhere
        assert world.run_until_true(lambda: tombstones(world) == [0, 0, 0], 300.0, 2.0)
        for node in world.nodes:  # lookaside rows are gone too
            assert (
                agent_of(node).conn.execute("SELECT count(*) FROM kv__crsql_pks").fetchone()[0] == 0
            )

        for core in (a, b):  # C's old write arrives again, late: a duplicate, dropped
            for frame in late_frames:
                core.replicator.handle_frame(None, frame, world.now)
            core.replicator.apply_pending(None, world.now)
        assert tables(world) == [[], [], []]

        a.execute([(UPSERT, ("k", "again"))], world.now)  # the key reused: a fresh insert
        assert world.run_until_true(
            lambda: all(t == [("k", "again", 0)] for t in tables(world)), 60.0
        )
        cls = [
            agent_of(n).conn.execute("SELECT DISTINCT cl FROM crsql_changes").fetchall()
            for n in world.nodes
        ]
        assert cls == [[(3,)]] * 3  # above the floor (2) on every node
        assert all(isinstance(n.core(REAPER), ReaperCore) for n in world.nodes)
    finally:
        world.close()


def test_a_node_joining_after_a_collection_reuses_the_key_so_that_all_agree():
    """n0 collects the delete, n1 never does (its reaper lags), n2 joins afterwards and inserts
    the key again: n2 holds nothing of the key (or, synced from n1, its tombstone), and its
    insert must win on n1 too."""
    totals = ReaperTotals()
    world = agent_world(3, 3, stagger=150.0, extra=[tombstone_gc(totals, interval=2.0, off={1})])
    try:
        world.run_until(152.0)  # n0 and n1 up, n2 not yet started
        n0, n1 = (agent_of(n) for n in world.nodes[:2])
        n0.execute([(UPSERT, ("k", "first"))], world.now)
        n1.execute([(UPSERT, ("j", "other"))], world.now)
        world.run_for(5.0)
        n0.execute([(DELETE, ("k",))], world.now)
        assert world.run_until_true(lambda: totals.reaped.get(0, 0) == 1, 140.0)
        assert world.now < 300.0 and agent_of(world.nodes[2]) is None
        assert n1.conn.execute(TOMBSTONES).fetchone() == (1,)  # n1 keeps it

        world.run_until(301.0)  # n2 starts at 300
        n2 = agent_of(world.nodes[2])
        assert n2 is not None
        assert world.run_until_true(lambda: tables(world)[2] == [("j", "other", 0)], 60.0)
        heard = n2.store.tombstone_floors == {"kv": 2}
        kept = n2.conn.execute(TOMBSTONES).fetchone() == (1,)
        assert heard or kept
        n2.execute([(UPSERT, ("k", "again"))], world.now)
        want = [("j", "other", 0), ("k", "again", 0)]
        assert world.run_until_true(lambda: all(t == want for t in tables(world)), 60.0)
        run_liveness(world, link=BASE_LINK)
        world.check()
    finally:
        world.close()
