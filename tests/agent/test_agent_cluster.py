"""Real agents on loopback: convergence, big transactions, partitions healed by sync alone."""

from __future__ import annotations

import random

import pytest
from agent_helpers import cluster, rows
from support import wait_for

from corrosion.core.changeset import Changeset

pytestmark = pytest.mark.anyio


async def table(agent, sql="SELECT k, v, n FROM kv ORDER BY k"):
    return await rows(agent, sql)


async def test_five_agents_converge_after_writes_on_random_nodes(tmp_path):
    rnd = random.Random(7)
    async with cluster(tmp_path, 5, with_api=False) as agents:
        for i in range(60):
            node = rnd.choice(agents)
            key = f"k{rnd.randrange(15)}"
            if rnd.random() < 0.8:
                await node.execute(
                    [
                        [
                            "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT DO UPDATE "
                            "SET v = excluded.v, n = n + 1",
                            [key, i],
                        ]
                    ]
                )
            else:
                await node.execute([["DELETE FROM kv WHERE k = ?", [key]]])

        async def converged() -> bool:
            tables = [await table(a) for a in agents]
            return all(t == tables[0] for t in tables) and all(a.gaps() == 0 for a in agents)

        await wait_for(converged, what="five agents to hold the same table with no gaps")
        heads = [a.sync_state()["heads"] for a in agents]
        assert all(h == heads[0] for h in heads)


async def test_big_transaction_crosses_in_chunks_and_applies_whole(tmp_path):
    async with cluster(tmp_path, 2, with_api=False) as (a, b):
        observed: set[int] = set()
        chunks: set[tuple[int, int]] = set()  # seq ranges of a's chunks that b applied
        apply = b.store.apply

        def counting_apply(items):
            for it in items:
                if isinstance(it, Changeset) and it.actor == a.actor_id:
                    chunks.add(it.seqs)
            return apply(items)

        b.store.apply = counting_apply
        commit = await a.execute_commit(
            [
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 10000) "
                "INSERT INTO items (id, body, owner) SELECT i, printf('body %05d', i), 'a' FROM s"
            ]
        )
        assert commit is not None and len(commit.changes) == 20000

        async def whole() -> bool:
            (count,) = (await rows(b, "SELECT count(*) FROM items"))[0]
            observed.add(count)
            return count == 10000

        await wait_for(whole, what="the 10k-row transaction to arrive")
        assert observed <= {0, 10000}, f"a reader saw a partial transaction: {sorted(observed)}"
        assert b.gaps() == 0
        assert await rows(b, "SELECT max(body) FROM items") == [("body 10000",)]
        assert len(chunks) > 1, "the transaction should have crossed in several chunks"
        assert min(lo for lo, _hi in chunks) == 0 and max(hi for _lo, hi in chunks) == 19999


@pytest.mark.parametrize("broadcast", [False])
async def test_partitioned_node_converges_through_sync_alone(tmp_path, broadcast):
    async with cluster(tmp_path, 3, with_api=False, perf={"broadcast": broadcast}) as (a, b, c):
        await a.execute([["INSERT INTO kv (k, v) VALUES ('before', 1)", []]])
        await wait_for(
            lambda: all(x.store.bookie.holds(a.actor_id, 1) for x in (b, c)),
            what="the first write to reach everyone by sync",
        )
        c.faults.isolated = True
        for i in range(20):
            await a.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", [f"a{i}", i]]])
            await b.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", [f"b{i}", i]]])
        await c.execute([["INSERT INTO kv (k, v) VALUES ('during', 'c')", []]])
        await wait_for(
            lambda: len(a.store.bookie.get(b.actor_id).held) == 20,
            what="a and b to sync with each other",
        )
        assert await rows(c, "SELECT count(*) FROM kv") == [(2,)]  # nothing crossed
        # a real partition: membership is cut too, each side sees the other down
        await wait_for(
            lambda: a.alive_members() == 1 and b.alive_members() == 1 and c.alive_members() == 0,
            what="both sides of the partition to mark the other down",
        )
        c.faults.isolated = False
        await wait_for(
            lambda: all(x.alive_members() == 2 for x in (a, b, c)),
            what="the two sides to find each other after the heal",
        )

        async def converged() -> bool:
            tables = [await table(x) for x in (a, b, c)]
            return all(t == tables[0] for t in tables) and all(x.gaps() == 0 for x in (a, b, c))

        await wait_for(converged, what="the healed partition to converge")
        assert len(await table(c)) == 42
        assert all(x.replicator.stats.broadcasts_sent == 0 for x in (a, b, c))
        assert all(x.replicator.stats.digests_sent == 0 for x in (a, b, c))


async def test_changes_received_by_broadcast_are_counted_once(tmp_path):
    # sync waits 30 s or more between sessions: the write reaches the other agent by broadcast
    slow_sync = {"min_sync_backoff": 30.0, "max_sync_backoff": 60.0}
    async with cluster(tmp_path, 2, with_api=False, perf=slow_sync) as (a, b):
        commit = await a.execute_commit(
            [["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", i]] for i in range(3)]
        )
        assert commit is not None

        async def arrived() -> bool:
            return await rows(b, "SELECT count(*) FROM kv") == [(3,)]

        await wait_for(arrived, what="the write to reach the other agent")
        assert b.events.sync_changes_recv == 0
        assert b.events.broadcast_changes_recv == len(commit.changes)
