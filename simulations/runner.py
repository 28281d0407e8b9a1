"""Running a derived configuration: build, safety phase, liveness phase, check, summarise."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .checkers import run_liveness
from .cluster import swim_world
from .faults import Schedule
from .metrics import SwimMetrics
from .scenarios import RunConfig
from .swim_checkers import swim_checkers
from .world import SimulationFailure, World

__all__ = ["RunResult", "run"]

Progress = Callable[[float, float], None]


@dataclass
class RunResult:
    config: RunConfig
    world: World
    metrics: SwimMetrics
    failure: SimulationFailure | None
    liveness_s: float
    settled: bool
    wall_s: float

    @property
    def digest(self) -> str:
        return self.world.digest()

    def summary(self) -> list[str]:
        w = self.world
        st = w.net.stats
        n = self.config.nodes
        virtual = w.now
        m = self.metrics.summary()
        checks = {c.name: c for c in w.checkers}
        lines = [
            f"virtual time    = {virtual:.3f} s (safety {self.config.duration:g} s, liveness "
            f"{self.liveness_s:.3f} s, {'settled' if self.settled else 'NOT settled'})",
            f"nodes           = {n} ({len(w.live_nodes())} live at the end)",
            f"events          = {w.sched.events}",
            f"datagrams       = sent {st.sent}, delivered {st.delivered}, lost {st.lost}, "
            f"cut {st.cut}, duplicated {st.duplicated}, to a down node {st.to_down}",
            f"streams         = {st.streams} ({st.streams_failed} failed)",
            f"faults applied  = {len(w.fault_log)}",
            "membership      = " + ", ".join(f"{k} {v}" for k, v in m.items()),
        ]
        if "swim-packet-size" in checks:
            lines.append(f"largest packet  = {checks['swim-packet-size'].largest} B")
        if "swim-retransmit-limit" in checks:
            limit = self.config.swim.retransmit_limit(n)
            lines.append(
                f"most sends of one update = {checks['swim-retransmit-limit'].most} (limit {limit})"
            )
        if "swim-message-load" in checks:
            lines.append(
                f"busiest member  = {checks['swim-message-load'].busiest:.1f} datagrams/s "
                "(10 s window)"
            )
        verdict = "OK" if self.failure is None else f"{len(self.failure.violations)} VIOLATIONS"
        lines.append(f"checkers        = {len(w.checkers)} ({verdict})")
        lines.append(f"trace records   = {w.trace.records}")
        return lines


def run(
    cfg: RunConfig,
    *,
    progress: Progress | None = None,
    sample_every: float = 0.0,
    checkers: bool = True,
) -> RunResult:
    """Run ``cfg``: safety phase with its faults, then heal and liveness, then every check."""
    wall = time.perf_counter()
    world = swim_world(
        cfg.seed,
        cfg.nodes,
        config=cfg.swim,
        link=cfg.start_link,
        bootstrap=cfg.bootstrap,
        stagger=cfg.stagger,
        checkers=swim_checkers() if checkers else [],
    )
    world.repro = cfg.repro
    world.config_text = cfg.describe()
    metrics = SwimMetrics(sample_every).attach(world)
    Schedule(cfg.faults).install(world)
    steps = 100
    for i in range(1, steps + 1):
        world.run_until(cfg.duration * i / steps)
        if progress is not None:
            progress(world.now, cfg.duration)
    liveness_s = run_liveness(world, link=cfg.link)
    failure = None
    try:
        world.check(final=True)
    except SimulationFailure as exc:
        failure = exc
    settled = bool(world.liveness and world.liveness[2])
    return RunResult(cfg, world, metrics, failure, liveness_s, settled, time.perf_counter() - wall)
