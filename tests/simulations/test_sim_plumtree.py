"""Plumtree (``gossip.broadcast = "plumtree"``) hosted in the simulator with full agents: under
loss the trees alone (IHAVE/GRAFT, no sync) bring every write to every node; under loss,
partitions and a crash, after heal every database is equal and no version is missing."""

from __future__ import annotations

import random

import pytest

from corrosion.core.replication import ReplicationConfig
from simulations import Delay, LinkModel, run_liveness
from simulations.agent_core import agent_of, agent_world
from simulations.strategies import BASE_LINK

UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"
LOSSY = LinkModel(Delay("uniform", 0.01, 0.02, 0.03), loss=0.05)


def write(world, rng: random.Random, i: int) -> tuple[bytes, int] | None:
    core = agent_of(world.nodes[rng.randrange(len(world.nodes))])
    if core is None:
        return None
    version = core.execute([(UPSERT, (f"k{rng.randrange(12)}", f"v{i}"))], world.now)
    return None if version is None else (core.store.actor_id, version)


@pytest.mark.parametrize("seed", range(4))
def test_under_loss_the_trees_alone_bring_every_write_to_every_node(seed):
    """Sync is pushed out of the run (its first round after 1000 s) and fan-out's digests do not
    exist in this mode: whatever arrives came by eager push or by IHAVE then GRAFT."""
    n = 12
    config = ReplicationConfig(
        broadcast_mode="plumtree", min_sync_backoff=1000.0, max_sync_backoff=1000.0
    )
    world = agent_world(seed, n, replication=config, link=LOSSY, checkers=False)
    try:
        world.run_until(n * 0.05 + 5.0)  # every node joined and knows every other
        assert all(len(agent_of(nd).replicator.peers) == n - 1 for nd in world.nodes)
        rng = random.Random(seed)
        written = []
        for i in range(40):
            if (w := write(world, rng, i)) is not None:
                written.append(w)
            world.run_for(rng.uniform(0.02, 0.3))

        def everywhere() -> bool:
            for node in world.nodes:
                store = agent_of(node).store
                for actor, version in written:
                    if actor != store.actor_id and not store.bookie.holds(actor, version):
                        return False
            return True

        assert world.run_until_true(everywhere, timeout=10.0, step=0.1), "a write was lost"
        reps = [agent_of(nd).replicator for nd in world.nodes]
        assert sum(r.stats.syncs_started for r in reps) == 0
        stats = [r.plumtree.stats for r in reps if r.plumtree is not None]
        assert len(stats) == n
        assert sum(s.grafts_sent for s in stats) > 0, "5 % loss should have needed GRAFTs"
        assert sum(s.prunes_sent for s in stats) > 0
        rows = [
            list(agent_of(nd).conn.execute("SELECT * FROM kv ORDER BY k")) for nd in world.nodes
        ]
        assert rows[0] and all(r == rows[0] for r in rows)
    finally:
        world.close()


@pytest.mark.parametrize("seed", range(6))
def test_plumtree_agents_converge_after_partitions_a_crash_and_loss(seed):
    config = ReplicationConfig(broadcast_mode="plumtree")
    world = agent_world(
        seed, 5 + seed % 3, replication=config, link=LinkModel(BASE_LINK.delay, loss=0.05)
    )
    try:
        world.run_until(2.0)
        rng = random.Random(seed)
        n = len(world.nodes)
        for i in range(40):
            write(world, rng, i)
            world.run_for(rng.uniform(0.05, 0.6))
            if i == 10:
                world.partition([world.nodes[: n // 2], world.nodes[n // 2 :]])
            if i == 15:
                world.crash(world.nodes[1])
            if i == 20:
                world.heal()
            if i == 25:
                world.restart(world.nodes[1])
        run_liveness(world, link=BASE_LINK)
        world.check()  # equal databases, no missing or partial version (agent_world's checkers)
        rows = [
            list(agent_of(nd).conn.execute("SELECT * FROM kv ORDER BY k")) for nd in world.nodes
        ]
        assert rows[0] and all(r == rows[0] for r in rows)
    finally:
        world.close()
