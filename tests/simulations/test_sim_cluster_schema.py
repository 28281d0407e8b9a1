"""The cluster schema in the simulator (the agent's real core and store): under partitions,
crashes and concurrent proposals every node ends on the same schema version and the same data,
and no change is lost while a node waits for a schema."""

from __future__ import annotations

import random

import pytest

from simulations import run_liveness
from simulations.agent_core import DEMO_SCHEMA, agent_of, agent_world
from simulations.strategies import BASE_LINK

BASE = DEMO_SCHEMA
LEFT = BASE.replace("n INTEGER DEFAULT 0)", "n INTEGER DEFAULT 0, left_col TEXT)")
RIGHT = BASE.replace("n INTEGER DEFAULT 0)", "n INTEGER DEFAULT 0, right_col TEXT)")
UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"


def state(node) -> tuple:
    core = agent_of(node)
    adv = core.store.schema_state()
    return adv.running, adv.blocked


@pytest.mark.parametrize("seed", range(6))
def test_concurrent_proposals_partitions_and_crashes_end_on_one_schema_and_one_dataset(seed):
    rng = random.Random(seed)
    n = 4 + seed % 3
    world = agent_world(seed, n)
    try:
        world.run_until(2.0)
        nodes = world.nodes
        left, right = nodes[: n // 2], nodes[n // 2 :]
        world.partition([left, right])
        world.run_for(rng.uniform(0.5, 3.0))
        # one proposer on each side of the partition, for the same version number
        agent_of(left[0]).propose_schema(LEFT, world.now)
        world.run_for(rng.uniform(0.0, 2.0))
        agent_of(right[-1]).propose_schema(RIGHT, world.now)
        for i in range(30):
            node = nodes[rng.randrange(n)]
            core = agent_of(node)
            if core is not None:
                core.execute([(UPSERT, (f"k{rng.randrange(10)}", f"v{i}"))], world.now)
            world.run_for(rng.uniform(0.05, 0.5))
            if i == 10:
                world.crash(nodes[1])
            if i == 20:
                world.restart(nodes[1])
        run_liveness(world, link=BASE_LINK)
        world.check()
        states = [state(node) for node in nodes]
        assert states[0][0].version == 1 and states[0][1] is None
        assert all(s == states[0] for s in states), states
        # then a version on top of the winner, with writes to its new column at once from the
        # proposer while a node is cut off and one restarts: nothing is lost
        winner = LEFT if "left_col" in _columns(nodes[0]) else RIGHT
        both = winner.replace("TEXT)", "TEXT, extra TEXT)")
        world.partition([nodes[:1], nodes[1:]])
        proposer = agent_of(nodes[-1])
        assert proposer.propose_schema(both, world.now) == 2
        for i in range(10):
            proposer.execute(
                [("UPDATE kv SET extra = ? WHERE k = ?", (f"e{i}", f"k{i}"))], world.now
            )
            world.run_for(0.2)
        world.crash(nodes[-1])  # the proposer, its last writes perhaps not yet sent
        world.crash(nodes[2])
        world.run_for(1.0)
        world.restart(nodes[2])
        world.restart(nodes[-1])
        run_liveness(world, link=BASE_LINK)
        world.check()
        assert {state(node) for node in nodes} == {state(nodes[-1])}
        assert state(nodes[0])[0].version == 2
        extra = [_rows(node, "SELECT k, extra FROM kv ORDER BY k") for node in nodes]
        assert all(r == extra[0] for r in extra)
        assert all(agent_of(node).store.pending_summary().versions == 0 for node in nodes)
    finally:
        world.close()


def _columns(node) -> list[str]:
    return [r[1] for r in agent_of(node).conn.execute("PRAGMA table_info(kv)")]


def _rows(node, sql: str) -> list[tuple]:
    return list(agent_of(node).conn.execute(sql))
