"""The orchestrator's step logs on a lying disk (``simulations.faulty_vfs``): the real service and
engine, their logs opened through the fault-injecting VFS, the power cut after a seeded number
of writes (whatever the engine writes next: a START, a COMPLETE, a document), the process gone
at once, the disk rewritten as it would be after the cut (unsynced writes lost or torn), and a
new process on the same directory. Every accepted run must resume and finish, every machine end
in the state promised (an accepted run is durable), and no step the engine reported complete
(its COMPLETE acknowledged by the log) may run again: only the step a cut interrupted restarts,
and it knows it (``is_restart``: steps are idempotent for that case).
"""

from __future__ import annotations

import random

import anyio
import pytest
from support import planted_bugs, wait_for
from test_orch_resume_random import CONFIG, FAST, idle, plan

from orchestrator.drivers import FakeDriver
from orchestrator.engine import EngineObserver
from orchestrator.service import Orchestrator
from simulations.faulty_vfs import FaultyVFS

pytestmark = pytest.mark.anyio


class Steps(EngineObserver):
    """Steps reported complete, and steps started again after that (the violations)."""

    def __init__(self, vfs: FaultyVFS) -> None:
        self.vfs = vfs
        self.completed: set[tuple[str, str]] = set()
        self.redone: list[str] = []
        self.lost: list[str] = []  # accepted work missing at the end
        self.restarts = 0

    def step_started(self, info, step, is_restart, retry):
        if (info.run_id, step) in self.completed:
            self.redone.append(f"{info.action} run {info.run_id}: {step} completed, run again")
        self.restarts += int(is_restart)

    def step_completed(self, info, step):
        if not self.vfs.down:  # acknowledged: the COMPLETE returned before the power went
            self.completed.add((info.run_id, step))


async def power_cut_scenario(tmp_path, seed: int) -> tuple[Steps, FaultyVFS]:
    rng = random.Random(seed)
    vfs = FaultyVFS(f"orch-cut-{seed}-{rng.random()}", random.Random(seed))
    steps = Steps(vfs)
    driver = FakeDriver()  # its instances outlive the process, as VMs outlive flyd
    path = tmp_path / f"s{seed}"
    promised: dict[str, str] = {}
    try:
        for round_ in range(5):
            last = round_ == 4
            with anyio.CancelScope() as scope:
                async with Orchestrator(
                    machines_path=path, driver=driver, observer=steps, backoff=FAST, vfs=vfs.name
                ) as orch:
                    if round_ == 0:
                        for _ in range(3):
                            mid = (await orch.create_machine("app", {"config": CONFIG}))["id"]
                            for op in plan(rng):
                                if op == "destroy":
                                    await orch.destroy_machine("app", mid, force=True, queue=True)
                                else:
                                    await getattr(orch, f"{op}_machine")("app", mid, queue=True)
                            promised[mid] = orch.projected_state(mid)
                    if last:
                        await wait_for(lambda: idle(orch, promised), 60, interval=0.001)
                        for mid, state in promised.items():
                            doc = orch.docs.find(mid)
                            got = "destroyed" if doc is None else doc["state"]
                            if got != state:
                                steps.lost.append(f"machine {mid} is {got}, promised {state}")
                        break
                    # the power goes a few writes from now (each START, COMPLETE... is several)
                    vfs.cut_power_after(rng.randint(0, 40))
                    await wait_for(lambda: vfs.down or idle(orch, promised), 60, interval=0.001)
                    scope.cancel()  # the process dies with the power (or the work ran out)
            vfs.cut_power()
            vfs.recover()
    finally:
        vfs.unregister()
    return steps, vfs


@pytest.mark.parametrize("seed", range(6))
async def test_power_cuts_never_redo_a_completed_step(tmp_path, seed):
    steps, _vfs = await power_cut_scenario(tmp_path, seed)
    assert steps.redone == [] and steps.lost == []
    assert steps.completed  # the runs did their work


async def test_the_cuts_interrupt_steps_and_lose_unsynced_writes(tmp_path):
    """The scenario has teeth: across seeds, cuts land inside steps (which restart) and take
    unsynced writes with them."""
    restarts = lost = 0
    for seed in range(6):
        steps, vfs = await power_cut_scenario(tmp_path, seed)
        restarts += steps.restarts
        lost += sum("kept" in i and not i.startswith("kept 0 of 0") for i in vfs.injected)
    assert restarts > 0 and lost > 0


async def test_a_step_log_that_does_not_sync_redoes_completed_steps(tmp_path, monkeypatch):
    """A planted bug: the step log commits with ``synchronous = NORMAL`` (the WAL is synced
    only at checkpoints), so a COMPLETE the engine was told of can vanish with the power."""
    planted_bugs.steplog_not_synced(monkeypatch)
    wrong = []
    for seed in range(6):
        steps, _vfs = await power_cut_scenario(tmp_path, seed)
        wrong += steps.redone + steps.lost
    assert wrong
