"""The agent's replication core (corrosion.core.replication) hosted in the simulator: writes on
random nodes under partitions, crashes and loss; after heal every database is equal and no
version is missing."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings

from corrosion.core.replication import Replicator
from simulations import LinkModel, SimulationFailure, run_liveness
from simulations.agent_core import agent_of, agent_world
from simulations.strategies import BASE_LINK, AgentMachine
from swim import MemberDown, MemberUp

UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"


def write_storm(world, seed: int, writes: int = 40) -> None:
    rng = random.Random(seed)
    n = len(world.nodes)
    for i in range(writes):
        core = agent_of(world.nodes[rng.randrange(n)])
        if core is not None:
            core.execute([(UPSERT, (f"k{rng.randrange(12)}", f"v{i}"))], world.now)
        world.run_for(rng.uniform(0.05, 0.6))
        if i == writes // 4:
            world.partition([world.nodes[: n // 2], world.nodes[n // 2 :]])
        if i == writes // 3:
            world.crash(world.nodes[1])
        if i == writes // 2:
            world.restart(world.nodes[1])


@pytest.mark.parametrize("seed", range(12))
def test_agents_converge_after_partitions_crashes_and_loss(seed):
    world = agent_world(seed, 4 + seed % 4, link=LinkModel(BASE_LINK.delay, loss=0.05))
    try:
        world.run_until(2.0)
        write_storm(world, seed)
        run_liveness(world, link=BASE_LINK)
        world.check()
        rows = [list(agent_of(n).conn.execute("SELECT * FROM kv ORDER BY k")) for n in world.nodes]
        assert rows[0] and all(r == rows[0] for r in rows)
    finally:
        world.close()


def test_the_convergence_checker_catches_a_lost_write():
    world = agent_world(1, 4)
    try:
        world.run_until(2.0)
        a = agent_of(world.nodes[0])
        a.execute([(UPSERT, ("x", "1"))], world.now)
        # A write behind the replication core's back: no version, never replicated.
        with a.conn:
            a.conn.execute("INSERT INTO kv (k, v) VALUES ('ghost', 'boo')")
        run_liveness(world, link=BASE_LINK, timeout=30.0)
        with pytest.raises(SimulationFailure, match=r"crdt-convergence.*databases differ"):
            world.check()
    finally:
        world.close()


TestAgent = AgentMachine.TestCase
TestAgent.settings = settings(
    max_examples=15,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


AGENT_DIGEST = """
import random
from simulations import run_liveness
from simulations.agent_core import agent_of, agent_world
from simulations.strategies import BASE_LINK
from tests.simulations.test_sim_agent import write_storm
world = agent_world(3, 5)
world.run_until(2.0)
write_storm(world, 3, writes=20)
run_liveness(world, link=BASE_LINK)
print(world.digest())
world.close()
"""


def test_agent_runs_are_deterministic_across_processes_and_hash_seeds():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    outs = []
    for hashseed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=str(root))
        out = subprocess.run([sys.executable, "-c", AGENT_DIGEST], cwd=root, env=env,
                             capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        outs.append(out.stdout.strip())
    assert len(outs[0]) == 32 and outs[0] == outs[1]


def test_the_simulator_learns_peers_through_the_agents_own_translation(monkeypatch):
    """Membership events become replication peers in one function, ``Replicator.member_event``,
    which the agent calls too: what the simulator checks is the agent's code."""
    seen: list[type] = []
    original = Replicator.member_event

    def spy(self, event):
        seen.append(type(event))
        return original(self, event)

    monkeypatch.setattr(Replicator, "member_event", spy)
    world = agent_world(3, 3)
    try:
        world.run_until(5.0)
        assert MemberUp in seen
        for node in world.nodes:
            core = agent_of(node)
            others = {agent_of(n).store.actor_id for n in world.nodes if n is not node}
            assert set(core.replicator.peers) == others
        world.crash(world.nodes[2])
        world.run_for(30.0)
        assert MemberDown in seen
        assert agent_of(world.nodes[2]) is None
        assert agent_of(world.nodes[0]).replicator.peers.keys() == {
            agent_of(world.nodes[1]).store.actor_id
        }
    finally:
        world.close()


def test_a_version_whose_only_whole_copy_is_down_is_not_required_after_heal():
    """Found by AgentMachine: n1 writes a version of many chunks over a lossy link and crashes
    at once (it stays down through the liveness phase). What the others received of it cannot be
    completed until n1 returns, so the bookkeeping checker must not ask for it; a version some
    live node holds whole must still reach every live node."""
    machine = AgentMachine()
    machine.build(seed=0, n=3)
    machine.replication_link(loss=0.2, dup=0.0, reorder=0.0)
    machine.big_write(i=1, rows=12, size=700, salt=0)
    machine.crash(i=1)
    machine.teardown()  # runs the liveness phase and the final checks: raises if they fail
