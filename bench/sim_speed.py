"""Simulator speed: simulated node-seconds per wall-clock second.

* ``sim_node_seconds_per_s``: a world of N swim members (LAN preset, 1 % loss on every link,
  warm start: each member's view restored before its first boot, so no join storm) runs 60
  virtual seconds with every SWIM checker on; node-seconds (N x 60) over the wall time of
  building the world plus running it. Target (issue 4): 1000 nodes x 60 virtual s in at most
  60 s of wall time on this 2-core machine, i.e. >= 1000 node-seconds/s. ``--quick`` uses 300.
* ``sim_wall_s_<N>x60``: that wall time itself (target <= 60 s at N = 1000).
* Baseline, same run, same N: the swim package's minimal in-memory host
  (``swim.testing.LocalNetwork``: same cores, same restored view, same loss, but no checkers,
  no trace digest, no fault model, no per-node disks) - the floor the real core itself costs.
  ``sim_overhead_ratio`` = simulator wall / baseline wall.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, parse_args

from simulations import LinkModel, swim_checkers, swim_world
from simulations.scenarios import PRESETS
from swim import Config, Member, Membership, NodeId, State
from swim.testing import LocalNetwork

VIRTUAL = 60.0
LOSS = 0.01


def simulator(n: int) -> tuple[float, float, int, str]:
    """(build s, run s, events, digest) of the simulator with every checker."""
    link = PRESETS["lan"][1]
    t0 = time.perf_counter()
    world = swim_world(
        1, n, link=LinkModel(link.delay, loss=LOSS), bootstrap="warm", checkers=swim_checkers()
    )
    t1 = time.perf_counter()
    world.run_until(VIRTUAL)
    world.check(final=False)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, world.sched.events, world.digest()


def baseline(n: int) -> tuple[float, float]:
    """(build s, run s) of swim.testing.LocalNetwork with the same restored view and loss."""
    link = PRESETS["lan"][1]
    t0 = time.perf_counter()
    config = Config.lan()
    net = LocalNetwork(seed=1, config=config, latency=link.delay.low, jitter=link.delay.mean,
                       loss=LOSS)  # fmt: skip
    view = [Member(NodeId(net.host, 7000 + i, 1), 0, State.ALIVE) for i in range(n)]
    for i in range(n):
        core = Membership((net.host, 7000 + i), config, random.Random(i), gen=1)
        net.nodes[core.addr] = core
        net.apply(core, core.restore(view, 0.0))
        net.apply(core, core.start(0.0))
    t1 = time.perf_counter()
    net.run_until(VIRTUAL)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--nodes", type=int, default=0, help="world size (default 1000, 300 quick)")

    args = parse_args("simulator speed", extra)
    report = Report(args.json)
    n = args.nodes or (300 if args.quick else 1000)
    report.info(f"{n} nodes, {VIRTUAL:g} virtual s, LAN preset, {LOSS:.0%} loss, warm start")
    build, run, events, digest = simulator(n)
    wall = build + run
    b_build, b_run = baseline(n)
    b_wall = b_build + b_run
    report.metric(
        "sim_node_seconds_per_s",
        n * VIRTUAL / wall,
        "node-s/s",
        f"swim.testing.LocalNetwork (no checkers/trace/faults): {n * VIRTUAL / b_wall:,.0f} "
        "node-s/s; target >= 1000 at 1000 nodes",
        nodes=n,
        baseline_value=round(n * VIRTUAL / b_wall, 1),
        steady_node_seconds_per_s=round(n * VIRTUAL / run, 1),
        events_per_s=round(events / run),
    )
    report.metric(
        f"sim_wall_s_{n}x60",
        wall,
        "s",
        f"target <= 60 s at 1000 nodes; LocalNetwork {b_wall:.1f} s",
        build_s=round(build, 2),
        run_s=round(run, 2),
        baseline_value=round(b_wall, 2),
    )
    report.metric(
        "sim_overhead_ratio",
        wall / b_wall,
        "x",
        "simulator (every checker, trace digest) / LocalNetwork, same world",
        digest=digest,
    )


if __name__ == "__main__":
    main()
