"""VOPR-style sweep of the agent's replication core: 200 seeds, each 20-27 simulated agents under
loss, writes on random nodes and a fault schedule drawn from the seed (split halves, an
asymmetric cut, an isolated node, crashes and restarts from disk, a clogged node); then heal and
quiet. Every SWIM checker runs, and CRDT convergence: equal databases and no gaps left.

A failure prints the seed, the fault schedule and the tail of the trace; replay one seed with
``pytest tests/simulations/test_sim_agent_seeds.py -k 'test_agent_seed[17]'``.
"""

from __future__ import annotations

import random

import pytest

from simulations import Delay, LinkModel, run_liveness
from simulations.agent_core import agent_of, agent_world
from simulations.strategies import BASE_LINK

UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"
SEEDS = range(200)
WRITES = 24
FAULTS = ("halves", "asymmetric", "isolate", "crash", "clog")


def fault_schedule(rng: random.Random) -> dict[int, str]:
    """Two or three faults at distinct write indexes (each healed or undone later)."""
    at = rng.sample(range(2, WRITES - 4), rng.randint(2, 3))
    return {i: rng.choice(FAULTS) for i in sorted(at)}


def run_seed(seed: int) -> None:
    rng = random.Random(seed)
    n = 20 + seed % 8
    # bookkeeping checked after every event on one seed in four (the check doubles a run's wall
    # time; tests/simulations/test_sim_antithesis.py checks every event of its runs), at the end
    # on all
    world = agent_world(
        seed,
        n,
        link=LinkModel(BASE_LINK.delay, loss=rng.choice([0.0, 0.02, 0.05])),
        bookkeeping_at_any_time=seed % 4 == 0,
    )
    try:
        world.run_until(2.0)
        schedule = fault_schedule(rng)
        undo: list[tuple[int, object]] = []  # (write index, action) to undo a fault later
        for i in range(WRITES):
            for when, action in [u for u in undo if u[0] == i]:
                action()
                undo.remove((when, action))
            fault = schedule.get(i)
            nodes = world.nodes
            if fault == "halves":
                pid = world.partition([nodes[: n // 2], nodes[n // 2 :]])
                undo.append((i + rng.randint(2, 6), lambda p=pid: world.heal(p)))
            elif fault == "asymmetric":
                cut = rng.sample(nodes, 3)
                pid = world.partition([cut, [x for x in nodes if x not in cut]], symmetric=False)
                undo.append((i + rng.randint(2, 6), lambda p=pid: world.heal(p)))
            elif fault == "isolate":
                pid = world.partition([[rng.choice(nodes)]])
                undo.append((i + rng.randint(2, 6), lambda p=pid: world.heal(p)))
            elif fault == "crash":
                victim = rng.choice(nodes[1:])
                if victim.up:
                    world.crash(victim)
                    undo.append((i + rng.randint(1, 5), lambda v=victim: world.restart(v)))
            elif fault == "clog":
                victim = rng.choice(nodes)
                world.clog(victim, Delay("uniform", 0.2, 0.8, 1.5))
                undo.append((i + rng.randint(2, 6), lambda v=victim: world.unclog(v)))
            core = agent_of(nodes[rng.randrange(n)])
            if core is not None:  # a crashed node takes no writes
                core.execute([(UPSERT, (f"k{rng.randrange(16)}", f"s{seed}w{i}"))], world.now)
            world.run_for(rng.uniform(0.05, 0.8))
        for _when, action in undo:
            action()
        run_liveness(world, link=BASE_LINK)
        world.check()
        tables = [
            list(agent_of(x).conn.execute("SELECT k, v FROM kv ORDER BY k")) for x in world.nodes
        ]
        assert tables[0] and all(t == tables[0] for t in tables)
    finally:
        world.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_agent_seed(seed):
    run_seed(seed)
