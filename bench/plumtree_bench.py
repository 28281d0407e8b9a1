"""Plumtree against fan-out broadcast, full agents in the simulator, both modes in one run.

Each world is N full agents (``simulations.agent_core``: the Replicator over a real SQLite
store, and SWIM), warm-started (every member known at boot, no join storm), on links of
40-60 ms one way with 1 % loss on every datagram, no checkers. It runs 60 virtual seconds: 5 s
of settling in which each of 20 writers writes once (Plumtree's trees form on those first
messages), then one write every 0.5 s from the writers in turn until 50 s, then quiet. Writes
upsert one row with a 100-byte value.

* ``bcast_bytes_per_write_per_node_<mode>_<N>``: bytes of replication datagrams (changesets,
  relays, digests, IHAVE/GRAFT/PRUNE; SWIM and sync streams not counted) sent from the first
  measured write until the end, ÷ measured writes ÷ N; ``payload_ratio`` divides that by the
  size of one write's changeset frame (the payload). Target for plumtree: <= 1.5x the payload.
* ``spread_p99_s_<mode>_<N>``: virtual seconds from a write's commit until a node applied it,
  p99 over every (write, node) pair; ``all_nodes_p99_s``: the same for the last node of each
  write. Target: plumtree within 1.5x of fan-out's, and < 1 s at 1,000 nodes.
* ``plumtree_bytes_ratio_<N>``, ``plumtree_p99_ratio_<N>``: plumtree ÷ fan-out, same run.
* ``sim_wall_s_agents_<mode>_<N>x60``: the simulator's wall time for those 60 virtual seconds
  (plus building the world: ``build_s``), on this machine.

``--quick``: 200 nodes only, and 20 virtual seconds; ``--nodes 200,1000`` picks the sizes,
``--modes plumtree`` the modes (the ratios need both).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, parse_args

from corrosion.core.replication import ReplicationConfig
from simulations import Delay, LinkModel
from simulations.agent_core import agent_of, agent_world

LINK = LinkModel(Delay("uniform", 0.04, 0.05, 0.06), loss=0.01)
WRITERS = 20
SETTLE = 5.0
GAP = 0.5
UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT DO UPDATE SET v = excluded.v"


@dataclass
class Run:
    mode: str
    n: int
    build_s: float = 0.0
    wall_s: float = 0.0
    writes: int = 0
    bytes_sent: int = 0
    payload: list[int] = field(default_factory=list)
    node_latencies: list[float] = field(default_factory=list)
    all_nodes: list[float] = field(default_factory=list)
    missed: int = 0  # (write, node) pairs not applied by the end

    @property
    def bytes_per_write_per_node(self) -> float:
        return self.bytes_sent / self.writes / self.n

    @property
    def payload_bytes(self) -> float:
        return sum(self.payload) / len(self.payload)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def run(n: int, mode: str, virtual: float, end_writes: float, seed: int = 1) -> Run:
    result = Run(mode, n)
    t0 = time.perf_counter()
    world = agent_world(
        seed,
        n,
        replication=ReplicationConfig(broadcast_mode=mode),
        link=LINK,
        checkers=False,
        bootstrap="warm",
        files_dir="/dev/shm" if Path("/dev/shm").is_dir() else None,
    )
    result.build_s = time.perf_counter() - t0
    applied: dict[tuple[bytes, int], list[float]] = {}

    def watch(rep) -> None:
        install = rep.install_apply

        def recorded(items, res, now):
            install(items, res, now)
            if res is not None:
                for key in res.applied:
                    applied.setdefault(key, []).append(now)

        rep.install_apply = recorded

    for node in world.nodes:
        watch(agent_of(node).replicator)
    counting = [False]

    def count(node, channel, dst, data, info, fate) -> None:
        if counting[0] and channel == "corrosion":
            result.bytes_sent += len(data)

    world.send_hooks.append(count)
    commits: list[tuple[bytes, int, float]] = []
    sizes: list[int] = []

    def write(index: int, i: int, measured: bool) -> None:
        core = agent_of(world.nodes[index])
        counting[0] = counting[0] or measured
        version = core.execute([(UPSERT, [f"k{i % 50}", f"{i:04d}" + "v" * 96])], world.now)
        if measured and version is not None:
            commits.append((core.store.actor_id, version, world.now))
            sizes.append(_frame_size(core, version))

    writers = list(range(0, n, n // WRITERS))[:WRITERS]
    for k, w in enumerate(writers):  # the warm-up writes: one per writer
        world.at(1.0 + k * (SETTLE - 2.0) / len(writers), write, w, k, False)
    t, i = SETTLE, 0
    while t < end_writes:
        world.at(t, write, writers[i % len(writers)], WRITERS + i, True)
        t += GAP
        i += 1
    t1 = time.perf_counter()
    world.run_until(virtual)
    result.wall_s = time.perf_counter() - t1
    result.writes = len(commits)
    result.payload = sizes
    for actor, version, at in commits:
        times = applied.get((actor, version), [])
        result.node_latencies += [x - at for x in times]
        result.missed += n - 1 - len(times)
        result.all_nodes.append(max(times) - at if len(times) == n - 1 else float("inf"))
    world.close()
    return result


def _frame_size(core, version: int) -> int:
    from corrosion.core.changeset import encode

    items = core.store.serve(core.store.actor_id, [(version, version)], max_versions=1)
    return sum(len(encode(item)) for item in items)


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--nodes", default="", help="sizes, comma separated (default 200,1000)")
        p.add_argument("--modes", default="fanout,plumtree", help="broadcast modes to run")

    args = parse_args("plumtree vs fan-out in the simulator", extra)
    report = Report(args.json)
    sizes = [int(x) for x in args.nodes.split(",") if x] or ([200] if args.quick else [200, 1000])
    virtual, end_writes = (20.0, 15.0) if args.quick else (60.0, 50.0)
    report.info(
        f"full agents, warm start, links 40-60 ms, 1 % loss, {WRITERS} writers, a write every "
        f"{GAP:g} s from {SETTLE:g} s to {end_writes:g} s, {virtual:g} virtual s"
    )
    for n in sizes:
        runs = {mode: run(n, mode, virtual, end_writes) for mode in args.modes.split(",")}
        for mode, r in runs.items():
            report.metric(
                f"bcast_bytes_per_write_per_node_{mode}_{n}",
                r.bytes_per_write_per_node,
                "B",
                f"payload {r.payload_bytes:.0f} B (one write's changeset frame)",
                payload_ratio=round(r.bytes_per_write_per_node / r.payload_bytes, 3),
                writes=r.writes,
            )
            report.metric(
                f"spread_p99_s_{mode}_{n}",
                percentile(r.node_latencies, 99) if r.node_latencies else float("inf"),
                "s",
                "virtual time, every (write, node) pair",
                p50_s=round(percentile(r.node_latencies, 50), 3) if r.node_latencies else None,
                all_nodes_p99_s=round(percentile(r.all_nodes, 99), 3),
                missed_pairs=r.missed,
            )
            report.metric(
                f"sim_wall_s_agents_{mode}_{n}x{virtual:g}",
                r.wall_s,
                "s",
                f"wall time of {virtual:g} virtual s ({n} full agents)",
                build_s=round(r.build_s, 2),
            )
        if not {"fanout", "plumtree"} <= runs.keys():
            continue
        f, p = runs["fanout"], runs["plumtree"]
        report.metric(
            f"plumtree_bytes_ratio_{n}",
            p.bytes_per_write_per_node / f.bytes_per_write_per_node,
            "x",
            "fan-out, same run (bytes per write per node)",
            plumtree_payload_ratio=round(p.bytes_per_write_per_node / p.payload_bytes, 3),
            target="plumtree <= 1.5x the payload",
        )
        report.metric(
            f"plumtree_p99_ratio_{n}",
            percentile(p.node_latencies, 99) / percentile(f.node_latencies, 99),
            "x",
            "fan-out, same run (spread p99); target <= 1.5",
        )


if __name__ == "__main__":
    main()
