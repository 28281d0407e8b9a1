"""Child process of the crash tests: runs an orchestrator until every run has finished.

``orch_crash_worker.py <dir> fresh <driver> <seed>`` submits a random workload (a few machines,
each a random valid sequence of operations), records the promised final states in
``submitted.json``, prints ``READY``, then lets the runs execute. ``... resume <driver>`` only
resumes. Every step start is printed (``STEP ...``) and appended to ``<dir>/journal`` so that the
parent can SIGKILL this process at a chosen step and later check what ran twice. When no run is
left it prints ``FINAL <json>`` and ``DONE``.

Steps of the gated driver wait until the workload is fully submitted, so a crash never
interrupts a submission (the parent only kills after READY).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import anyio
from support import wait_for

from orchestrator.drivers import ProcessDriver, RuncDriver
from orchestrator.engine import Backoff, EngineObserver
from orchestrator.service import Orchestrator

COMMAND = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"]


class Gated:
    """Delegates to a driver; every call first waits for the gate."""

    def __init__(self, driver, gate: anyio.Event) -> None:
        self._driver = driver
        self._gate = gate
        self.name = driver.name

    def __getattr__(self, name):
        attr = getattr(self._driver, name)
        if name in ("aclose",) or not callable(attr):
            return attr

        async def gated(*args, **kwargs):
            # the service's config check (a prepare from create_machine) is part of submitting
            # (its caller, through the orchestrator's timing wrapper: a few frames up)
            caller, callers = sys._getframe(1), []
            while caller is not None and len(callers) < 3:
                callers.append(caller.f_code.co_name)
                caller = caller.f_back
            if "_check_driver" not in callers:
                await self._gate.wait()
            return await attr(*args, **kwargs)

        return gated


class Journal(EngineObserver):
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def step_started(self, info, step, is_restart, retry):
        line = (
            f"STEP {info.run_id} {info.machine_id} {info.action} {step} {int(is_restart)} {retry}\n"
        )
        os.write(self.fd, line.encode())
        os.write(1, line.encode())


def workload(rng: random.Random) -> list[list[str]]:
    """Per machine: create, then 1-3 operations valid in sequence, maybe a final destroy."""
    plans = []
    for _ in range(2):
        state, ops = "started", ["create"]
        for _ in range(rng.randint(1, 3)):
            choices = {"started": ["stop", "restart", "cordon"], "stopped": ["start"]}[state]
            choices = [c for c in choices if c != ops[-1]]  # a pending twin is "already running"
            op = rng.choice(choices)
            ops.append(op)
            state = {"stop": "stopped", "start": "started"}.get(op, state)
        if rng.random() < 0.3:
            ops.append("destroy")
        plans.append(ops)
    return plans


async def main(argv: list[str]) -> None:
    base = Path(argv[1])
    mode, kind = argv[2], argv[3]
    gate = anyio.Event()
    if mode == "resume":
        gate.set()
    inner = (ProcessDriver if kind == "process" else RuncDriver)(base / "instances")
    orch = Orchestrator(
        machines_path=base / "machines",
        driver=Gated(inner, gate),
        worker="w1",
        observer=Journal(base / "journal"),
        backoff=Backoff(initial=0.01, maximum=0.1),
        keep_runs=1,  # finished runs are compacted at once: a resume must not need them
    )
    async with orch:
        if mode == "fresh":
            rng = random.Random(int(argv[4]))
            promised = {}
            stop_config = {"timeout": "200ms"}
            for plan in workload(rng):
                body = {"config": {"image": "busybox", "init": {"exec": COMMAND},
                                   "stop_config": stop_config}}  # fmt: skip
                mid = (await orch.create_machine("app", body))["id"]
                for op in plan[1:]:
                    if op == "destroy":
                        await orch.destroy_machine("app", mid, force=True, queue=True)
                    else:
                        await getattr(orch, f"{op}_machine")("app", mid, queue=True)
                promised[mid] = orch.projected_state(mid)
            tmp = base / "submitted.json.tmp"
            tmp.write_text(json.dumps(promised))
            os.replace(tmp, base / "submitted.json")
            os.write(1, b"READY\n")
            gate.set()

        def settled() -> bool:
            # no run left, and every destroyed machine archived and retired (that happens
            # after its last run has finished, in a thread: a destroyed document may linger)
            ids = orch.machine_ids()
            return not (
                orch.engine.list_runs()
                or any(map(orch.engine.busy, ids))
                or any(orch.doc(mid)["state"] == "destroyed" for mid in ids)
            )

        await wait_for(settled, 120, "every run to finish and destroyed machines to retire")
        final = {}
        for mid in orch.machine_ids():
            doc = orch.doc(mid)
            status = await inner.status(doc["instance_id"])
            final[mid] = {"state": doc["state"], "instance": str(status.state),
                          "instance_id": doc["instance_id"]}  # fmt: skip
        os.write(1, f"FINAL {json.dumps(final)}\n".encode())
    os.write(1, b"DONE\n")


if __name__ == "__main__":
    anyio.run(main, sys.argv)
