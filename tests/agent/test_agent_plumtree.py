"""Real agents on loopback with ``gossip.broadcast = "plumtree"``: writes on random nodes reach
every node through the trees (sync is pushed out of the test's time), over the real peer
streams, which name each frame's sender by their hello."""

from __future__ import annotations

import contextlib
import logging
import random

import anyio
import pytest
from agent_helpers import agent_config, cluster, rows, seed_addr
from support import wait_for

from corrosion import Agent
from corrosion.surfaces.admin_client import admin_request
from corrosion.surfaces.metrics import collect, render

pytestmark = pytest.mark.anyio

UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT DO UPDATE SET v = excluded.v, n = n + 1"


async def test_four_plumtree_agents_converge_by_broadcast_alone(tmp_path):
    rnd = random.Random(3)
    async with cluster(
        tmp_path,
        4,
        with_api=False,
        gossip={"broadcast": "plumtree"},
        perf={"min_sync_backoff": 3600.0, "max_sync_backoff": 3600.0},
    ) as agents:
        for i in range(40):
            await rnd.choice(agents).execute([[UPSERT, [f"k{rnd.randrange(10)}", i]]])

        async def converged() -> bool:
            tables = [await rows(a, "SELECT k, v, n FROM kv ORDER BY k") for a in agents]
            return bool(tables[0]) and all(t == tables[0] for t in tables)

        await wait_for(converged, what="four plumtree agents to hold the same table")
        assert all(a.gaps() == 0 for a in agents)
        reps = [a.replicator for a in agents]
        assert all(r.plumtree is not None for r in reps)
        assert sum(r.stats.syncs_started for r in reps) == 0, "sync should not have run"
        assert sum(r.plumtree.stats.eager_sent for r in reps if r.plumtree) > 0
        # the first messages of each origin flood, duplicates PRUNE the later senders
        assert sum(r.plumtree.stats.prunes_received for r in reps if r.plumtree) > 0

        # what an operator sees: the trees through the admin socket, the counters in /metrics
        stats = [
            await anyio.to_thread.run_sync(admin_request, a.config.admin_socket(), "plumtree stats")
            for a in agents
        ]
        assert all(s["peers"] == 3 for s in stats)
        assert sum(s["eager_sent"] for s in stats) == sum(
            r.plumtree.stats.eager_sent for r in reps if r.plumtree
        )
        trees = [(origin, t) for s in stats for origin, t in s["trees"].items()]
        assert trees and all(len(origin) == 32 for origin, _ in trees)
        assert any(t["eager"] for _, t in trees), stats  # each origin pushes to someone
        text = render(collect(agents[0]))
        assert "corro_plumtree_eager_sent_total " in text
        assert 'corro_plumtree_links{kind="eager"}' in text


async def test_a_node_in_the_other_broadcast_mode_is_named_in_the_log(tmp_path, caplog):
    """A cluster must share one mode. One plumtree node among fan-out ones: a write of a fan-out
    node reaches the plumtree node twice (fan-out relays it), whose PRUNE the fan-out node drops
    as malformed, naming the mismatch; sync still converges them."""
    caplog.set_level(logging.WARNING, logger="corrosion.apply")
    async with contextlib.AsyncExitStack() as stack:
        tree = await stack.enter_async_context(
            Agent(agent_config(tmp_path, "tree", gossip={"broadcast": "plumtree"}))
        )
        fans = [
            await stack.enter_async_context(
                Agent(agent_config(tmp_path, f"fan{i}", [seed_addr(tree)]))
            )
            for i in range(2)
        ]
        everyone = [tree, *fans]
        await wait_for(lambda: all(a.alive_members() == 2 for a in everyone),
                       what="the three to meet")  # fmt: skip
        writes = 0

        async def named() -> bool:
            nonlocal writes
            if "every node of a cluster must use the same broadcast mode" in caplog.text:
                return True
            await fans[writes % 2].execute([[UPSERT, [f"k{writes}", writes]]])
            writes += 1
            return False

        await wait_for(named, what="a fan-out node to name the mismatch")
        assert 'a plumtree PRUNE frame, but this node runs gossip.broadcast = "fanout"' in (
            caplog.text
        )

        async def converged() -> bool:
            tables = [await rows(a, "SELECT k, v FROM kv ORDER BY k") for a in everyone]
            return len(tables[0]) == writes and all(t == tables[0] for t in tables)

        await wait_for(converged, what="the three to hold every write")
