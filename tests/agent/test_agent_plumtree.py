"""Real agents on loopback with ``gossip.broadcast = "plumtree"``: writes on random nodes reach
every node through the trees (sync is pushed out of the test's time), over the real peer
streams, which name each frame's sender by their hello."""

from __future__ import annotations

import random

import anyio
import pytest
from agent_helpers import cluster, rows
from support import wait_for

from corrosion.surfaces.admin import admin_request
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
        writer = next(s for s in stats if s["trees"])
        origin, tree = next(iter(writer["trees"].items()))
        assert len(origin) == 32 and tree["eager"], writer
        text = render(collect(agents[0]))
        assert "corro_plumtree_eager_sent_total " in text
        assert 'corro_plumtree_links{kind="eager"}' in text
