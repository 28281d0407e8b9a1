"""A deterministic world for property testing the real protocol cores.

One process, one virtual clock, one seed. Nodes host sans-IO cores (``swim.Membership`` now, the
agent's replication core next) and real crdt databases; a faulty network delays, drops,
duplicates, reorders and partitions their datagrams; nodes crash and restart from their disks;
checkers watch invariants on every run. Same seed, same trace digest.

    from simulations import swim_world, swim_checkers, run_liveness

    world = swim_world(seed=7, n=8)              # 8 swim members joining through 3 seeds
    world.run_until(20.0)
    world.crash(world.nodes[3])
    world.partition([world.nodes[:4], world.nodes[4:]])
    world.run_until(60.0)
    run_liveness(world)                          # heal everything, run until settled
    world.check()                                # raises SimulationFailure (seed + config)

Modules: ``world`` (the world and its faults), ``network`` (link models, partitions), ``node``
(nodes, disks, the :class:`Core` hosting interface), ``swim_core`` (hosting swim),
``checkers``/``swim_checkers``/``crdt_checks`` (invariants), ``scenarios``/``runner``/``cli``
(``python -m simulations run``), ``strategies`` (hypothesis), ``crdt_sync`` (a reference
replication core over real crdt databases), ``metrics`` (measurements for summaries and benches),
``aio``/``orch_core``/``orch_checks``/``orch_world``/``orch_cli`` (orchestrator workers on
virtual time beside the agents, their faults and checkers), ``explore`` (every interleaving of
a small bounded model of the replication core, breadth-first: a model checker).
"""

from .checkers import Checker, run_liveness
from .cluster import add_swim_node, swim_world, warm_start
from .errors import SimulationError
from .faults import FaultEvent, Schedule
from .network import Delay, LinkModel, Partition
from .node import Core, CoreSpec, Disk, Port, SimNode
from .rng import Streams
from .scenarios import SCENARIOS, RunConfig, derive
from .swim_checkers import swim_checkers
from .swim_core import SWIM, SwimCore, swim
from .world import SimulationFailure, Violation, World

__all__ = [
    "SCENARIOS",
    "SWIM",
    "Checker",
    "Core",
    "CoreSpec",
    "Delay",
    "Disk",
    "FaultEvent",
    "LinkModel",
    "Partition",
    "Port",
    "RunConfig",
    "Schedule",
    "SimNode",
    "SimulationError",
    "SimulationFailure",
    "Streams",
    "SwimCore",
    "Violation",
    "World",
    "add_swim_node",
    "derive",
    "run_liveness",
    "swim",
    "swim_checkers",
    "swim_world",
    "warm_start",
]
