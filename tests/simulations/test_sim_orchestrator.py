"""Orchestrator workers (the real ``Orchestrator`` with ``FakeDriver``) in the simulator, beside
simulated agents that replicate their published rows: seeded random operations under process
kills, node crashes, partitions, driver faults and agent outages; after recovery and heal every
run has finished and every replica holds each worker's truth. Also: the same seed gives the same
digest (in one process and across processes), and each checker fails a deliberately broken
worker, so these tests can fail."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from orchestrator.engine import Engine, _Live
from orchestrator.exits import ExitWatchers
from orchestrator.operations import MachineOperations
from simulations import SimulationFailure, run_liveness
from simulations.orch_core import OrchSettings, orchestrator_of
from simulations.orch_world import BASE_LINK, orchestrator_world, recover, run_orchestrator
from simulations.strategies import OrchestratorMachine

SWEEP_SEEDS = int(os.environ.get("ORCH_SIM_SEEDS", "40"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet_publish_retries():
    """Publish retries during injected outages log a warning each; thousands per sweep."""
    logger = logging.getLogger("orchestrator")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.mark.parametrize("seed", range(SWEEP_SEEDS))
def test_seeded_sweep(seed):
    world, stats = run_orchestrator(seed, n=3 + seed % 2, duration=40.0)
    try:
        c = stats.counts
        assert c.get("op create accepted", 0) > 0, c
        assert c.get("run succeeded", 0) > 0, c
    finally:
        world.close()


def test_the_sweep_exercises_kills_resumes_and_faults():
    """Over a few seeds the workload really kills processes mid-run and resumes runs."""
    totals: dict[str, int] = {}
    for seed in range(4):
        world, stats = run_orchestrator(seed, n=3, duration=40.0)
        world.close()
        for k, v in stats.counts.items():
            totals[k] = totals.get(k, 0) + v
    assert totals.get("down", 0) >= 8, totals
    assert totals.get("run resumed", 0) >= 3, totals
    assert totals.get("op stop accepted", 0) >= 4, totals
    assert totals.get("op destroy accepted", 0) >= 2, totals


def _digest(seed: int) -> tuple[str, list]:
    world, _ = run_orchestrator(seed, n=3, duration=20.0)
    try:
        rows = sorted(orchestrator_of(world.nodes[0]).port.sibling("corrosion").conn.execute(
            "SELECT id, worker, state FROM machines"))  # fmt: skip
        return world.digest(), rows
    finally:
        world.close()


def test_same_seed_same_digest():
    first, rows = _digest(5)
    assert rows
    assert _digest(5) == (first, rows)
    assert _digest(6)[0] != first


DIGEST = """
import logging
logging.disable(logging.WARNING)
from simulations.orch_world import run_orchestrator
world, stats = run_orchestrator(11, n=3, duration=15.0)
print(world.digest(), sorted(stats.counts.items()))
world.close()
"""


def test_same_digest_across_processes_and_hash_seeds():
    outs = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run([sys.executable, "-c", DIGEST], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        outs.append(out.stdout)
    assert outs[0] == outs[1] and outs[0].strip()


# --- each checker catches a deliberately broken worker -------------------------------------


def _started_machine(world, node_index: int = 0) -> str:
    core = orchestrator_of(world.nodes[node_index])
    core.submit("create", body={"config": {"image": "busybox", "init": {"cmd": ["sleep"]}}})
    world.run_for(3.0)
    (mid,) = core.machine_ids()
    assert core.orch.doc(mid)["state"] == "started"
    return mid


def test_one_active_run_catches_an_engine_without_per_machine_queues(monkeypatch):
    def enqueue_without_queue(self, machine_id, state, *, resumed):
        # the bug: every run gets its own queue, so runs of one machine execute concurrently
        live = _Live(machine_id=machine_id, state=state, resumed=resumed)
        self._live[state.run_id] = live
        key = f"{machine_id}/{state.run_id}"
        self._queues[key] = deque([live])
        self._tg.start_soon(self._drain, key)
        self.observer.run_started(live.info())

    world = orchestrator_world(1, 3)
    try:
        world.run_until(3.0)
        mid = _started_machine(world)
        monkeypatch.setattr(Engine, "_enqueue", enqueue_without_queue)
        core = orchestrator_of(world.nodes[0])
        core.kill("reload with the broken engine")
        core.revive()

        async def two_stops():  # a client's two requests, before the first run began
            await core.orch.stop_machine("app", mid)
            await core.orch.stop_machine("app", mid)  # the real engine: AlreadyRunningError

        core.vloop.spawn(two_stops(), "client")
        core.vloop.drain()
        world.run_for(5.0)
        with pytest.raises(SimulationFailure, match=r"orch-one-active-run.*two active stop runs"):
            world.check(final=False)
    finally:
        world.close()


def test_runs_finish_catches_a_stop_that_never_returns():
    world = orchestrator_world(2, 3)
    try:
        world.run_until(3.0)
        mid = _started_machine(world)
        core = orchestrator_of(world.nodes[0])

        async def hang(instance_id, **kwargs):  # the bug: a driver stop that never returns
            await core.vloop.future()

        core.driver.stop = hang
        core.submit("stop", mid)
        world.run_for(2.0)
        recover(world)
        run_liveness(world, link=BASE_LINK, timeout=30.0)
        with pytest.raises(SimulationFailure, match=r"orch-runs-finish.*live run.*stop"):
            world.check(final=True)
    finally:
        world.close()


def test_runs_finish_catches_an_exit_nobody_handles(monkeypatch):
    async def drop(self, machine_id, key, exit_):  # the bug: the watcher loses the exit
        return None

    world = orchestrator_world(4, 3)
    try:
        world.run_until(3.0)
        mid = _started_machine(world)
        core = orchestrator_of(world.nodes[0])
        monkeypatch.setattr(ExitWatchers, "_submit", drop)
        core.driver.crash(core.orch.doc(mid)["instance_id"], 3)
        core.vloop.drain()
        world.run_for(2.0)
        run_liveness(world, link=BASE_LINK, timeout=30.0)
        with pytest.raises(SimulationFailure, match=r"orch-runs-finish.*started but its instance"):
            world.check(final=True)
    finally:
        world.close()


def test_published_rows_catches_a_publisher_that_loses_writes():
    world = orchestrator_world(3, 3)
    try:
        world.run_until(3.0)
        mid = _started_machine(world)
        core = orchestrator_of(world.nodes[0])

        async def lose(statements):  # the bug: success reported, nothing written
            return {"results": []}

        core.publisher.execute = lose
        core.submit("stop", mid)
        world.run_for(5.0)
        run_liveness(world, link=BASE_LINK, timeout=30.0)
        with pytest.raises(SimulationFailure, match=r"orch-published-rows.*stale.*state='started'"):
            world.check(final=True)
    finally:
        world.close()


def test_steps_once_catches_a_stop_that_does_not_mark_the_machine_stopped(monkeypatch):
    async def forget(self, ctx):  # the bug: the stop run succeeds, the document stays stopping
        return None

    world = orchestrator_world(5, 3)
    try:
        world.run_until(3.0)
        mid = _started_machine(world)
        monkeypatch.setattr(MachineOperations, "mark_stopped", forget)
        core = orchestrator_of(world.nodes[0])
        core.kill("reload with the broken operation")
        core.revive()
        core.submit("stop", mid)
        world.run_for(3.0)
        with pytest.raises(SimulationFailure, match=r"orch-steps-once.*succeeded but left the "
                           r"machine stopping, not stopped"):  # fmt: skip
            world.check(final=False)
    finally:
        world.close()


def test_a_kill_point_after_a_driver_effect_is_resumed():
    """Killed right after the driver stopped the instance, before the stop step's COMPLETE:
    the restarted process re-runs that step (told it is a restart) and finishes the stop."""
    world = orchestrator_world(4, 3, settings=OrchSettings(restart_delay=2.0))
    events = []
    world.event_hooks.append(lambda node, ch, e: events.append(e) if ch == "orchestrator" else None)
    try:
        world.run_until(3.0)
        mid = _started_machine(world)
        core = orchestrator_of(world.nodes[0])
        core.kill_points.arm(4)  # steps mark_stopping and stop_instance, driver stop: before, after
        core.submit("stop", mid)
        world.run_for(1.0)
        assert not core.up
        world.run_for(5.0)
        assert core.up and core.orch.doc(mid)["state"] == "stopped"
        downs = [e for e in events if e.kind == "down"]
        assert downs and "after driver stop" in downs[-1].detail
        resumed = [e for e in events if e.kind == "step_started" and "restart" in e.detail]
        assert [e.step for e in resumed][:1] == ["stop_instance"]
        run_liveness(world, link=BASE_LINK)
        world.check()
    finally:
        world.close()


TestOrchestratorMachine = OrchestratorMachine.TestCase
TestOrchestratorMachine.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_cli_orchestrator_scenario(capsys):
    from simulations.cli import main

    args = ["run", "--seed", "2", "--nodes", "3", "--duration", "15", "--scenario",
            "orchestrator", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    for needle in ("scenario        = orchestrator", "runs            = ", "checkers        = ",
                   "trace digest    = "):  # fmt: skip
        assert needle in first
    assert main(args) == 0
    digest = [ln for ln in first.splitlines() if ln.startswith("trace digest")]
    assert digest == [ln for ln in capsys.readouterr().out.splitlines()
                      if ln.startswith("trace digest")]  # fmt: skip
