"""``python -m simulations run --scenario orchestrator``: one seeded orchestrator run, printed
the way the swim scenarios are (configuration, summary, trace digest; a violation exits 1 with
the seed and the last trace records).

Kept apart from ``runner``/``scenarios``, which derive swim fault schedules: this scenario's
operations and faults come from :class:`~simulations.orch_world.Workload` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .checkers import run_liveness
from .orch_core import OrchSettings
from .orch_world import BASE_LINK, OrchStats, Workload, orchestrator_world, recover
from .world import SimulationFailure

__all__ = ["run_orchestrator_cli"]


def run_orchestrator_cli(
    seed: int,
    nodes: int,
    duration: float,
    *,
    progress: Callable[[float, float], None] | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Run, print, and return the exit status (0 ok, 1 a violation)."""
    wall = time.perf_counter()
    settings = OrchSettings()
    world = orchestrator_world(seed, nodes, settings=settings)
    try:
        load = Workload(world)
        warm = nodes * 0.05 + 2.0
        config = [
            f"seed            = {seed}",
            "scenario        = orchestrator",
            f"nodes           = {nodes} (each: agent + swim + orchestrator worker, FakeDriver)",
            f"safety phase    = {duration:g} s after a {warm:g} s warm-up",
            f"driver          = latency {settings.latency:g} s, stop delay "
            f"{settings.stop_delay:g} s; killed processes restart after "
            f"{settings.restart_delay} s",
            f"operations      = one every {load.op_interval:g} s on average "
            f"(at most {load.max_machines} machines per worker)",
            f"faults          = one every {load.fault_interval:g} s on average: "
            + ", ".join(load.faults),
        ]
        world.repro = f"python -m simulations run --seed {seed} --nodes {nodes} " + (
            f"--duration {duration:g} --scenario orchestrator"
        )
        world.config_text = "\n".join(config)
        out("== configuration")
        for line in config:
            out(line)
        stats = OrchStats()
        stats.attach(world)
        load.schedule(warm, warm + duration)
        end = warm + duration
        for i in range(1, 101):
            world.run_until(end * i / 100)
            if progress is not None:
                progress(world.now, end)
        recover(world)
        liveness = run_liveness(world, link=BASE_LINK)
        failure = None
        try:
            world.check(final=True)
        except SimulationFailure as exc:
            failure = exc
        st = world.net.stats
        settled = bool(world.liveness and world.liveness[2])
        c = stats.counts
        runs = {k[4:]: v for k, v in sorted(c.items()) if k.startswith("run ")}
        ops = {k[3:]: v for k, v in sorted(c.items()) if k.startswith("op ")}
        out("== summary")
        out(f"virtual time    = {world.now:.3f} s (liveness {liveness:.3f} s, "
            f"{'settled' if settled else 'NOT settled'})")  # fmt: skip
        out("api calls       = " + ", ".join(f"{k} {v}" for k, v in ops.items()))
        out("runs            = " + ", ".join(f"{k} {v}" for k, v in runs.items()))
        out(f"processes       = started {c.get('up', 0)}, killed {c.get('down', 0)}, "
            f"steps {c.get('step_started', 0)}")  # fmt: skip
        out(f"faults applied  = {len(world.fault_log)} (network and node; plus process kills)")
        out(f"datagrams       = sent {st.sent}, delivered {st.delivered}, lost {st.lost}, "
            f"cut {st.cut}")  # fmt: skip
        verdict = "OK" if failure is None else f"{len(failure.violations)} VIOLATIONS"
        out(f"checkers        = {len(world.checkers)} ({verdict})")
        out(f"wall time       = {time.perf_counter() - wall:.2f} s")
        out(f"trace digest    = {world.digest()}")
        if failure is not None:
            out("== FAILURE")
            out(str(failure))
            return 1
        return 0
    finally:
        world.close()
