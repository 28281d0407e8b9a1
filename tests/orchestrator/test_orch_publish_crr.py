"""The publisher seam against the real CRR engine: the machines table schema is accepted as a
CRR, the orchestrator's statements apply to it, and a second replica that merges the changes
converges to the worker's truth (including deletes of destroyed machines)."""

from __future__ import annotations

import anyio
import pytest
from orch_helpers import CrrPublisher
from support import wait_for

import crdt
from orchestrator.drivers import FakeDriver
from orchestrator.engine import Backoff
from orchestrator.publish import COLUMNS, MACHINES_SCHEMA, MACHINES_TABLE
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio


def replica():
    conn = crdt.connect(":memory:")
    conn.execute(MACHINES_SCHEMA)
    crdt.as_crr(conn, MACHINES_TABLE)
    return conn


def rows(conn):
    cols = ", ".join(COLUMNS)
    return conn.execute(f"SELECT {cols} FROM {MACHINES_TABLE} ORDER BY id").fetchall()


async def test_published_rows_replicate_and_converge(tmp_path):
    worker, other = replica(), replica()
    synced = 0

    def sync() -> None:
        nonlocal synced
        changes = crdt.changes_since(worker, synced)
        if changes:
            crdt.merge(other, changes)
            synced = max(c[5] for c in changes)

    orch = Orchestrator(
        machines_path=tmp_path / "m",
        driver=FakeDriver(),
        worker="w1",
        publisher=CrrPublisher(worker),
        backoff=Backoff(initial=0.001, maximum=0.01),
    )

    async def settled(mid: str, state: str) -> None:
        assert await orch.wait_machine("app", mid, state=state, timeout=10)
        await wait_for(
            lambda: not (orch.engine.busy(mid) or orch.publish_queue._dirty), 10, interval=0.002
        )
        with anyio.fail_after(10):
            await orch.publish_queue.idle.wait()

    config = {"image": "busybox", "init": {"cmd": ["sleep", "600"]}}
    async with orch:
        a = (await orch.create_machine("app", {"config": config}))["id"]
        b = (await orch.create_machine("app", {"config": config}))["id"]
        await settled(a, "started")
        await settled(b, "started")
        sync()
        assert rows(other) == rows(worker)
        assert {r[0]: r[4] for r in rows(other)} == {a: "started", b: "started"}
        await orch.stop_machine("app", a)
        await orch.cordon_machine("app", b)
        await settled(a, "stopped")
        await settled(b, "started")
        sync()
        assert rows(other) == rows(worker)
        states = {r[0]: (r[4], r[7]) for r in rows(other)}
        assert states == {a: ("stopped", 0), b: ("started", 1)}
        await orch.destroy_machine("app", a)
        await settled(a, "destroyed")
        await wait_for(
            lambda: not (orch.docs.find(a) is not None or orch.publish_queue._dirty),
            10,
            interval=0.002,
        )
        with anyio.fail_after(10):
            await orch.publish_queue.idle.wait()
        sync()
        assert rows(other) == rows(worker) and [r[0] for r in rows(other)] == [b]
