"""The engine says at INFO when a run starts and how it ended (WARNING with the error when it
failed), on the ``orchestrator.engine`` logger, with the run's ids as fields."""

from __future__ import annotations

import logging

import pytest

from orchestrator.engine import Engine
from orchestrator.errors import AbortError
from orchestrator.store import MachineStore

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hang_deadline")]


async def test_runs_started_finished_and_failed_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    store = MachineStore(tmp_path / "machines")
    store.create("m1")

    async def ok(ctx):
        return {"done": True}

    async def boom(ctx):
        raise AbortError("image not found")

    try:
        async with Engine(store) as engine:
            engine.register("create", [("ok", ok)])
            engine.register("start", [("ok", ok), ("boom", boom)])
            good = await engine.wait(await engine.start("m1", "create"))
            bad = await engine.wait(await engine.start("m1", "start"))
    finally:
        store.close()
    lines = [
        (r.levelname, r.getMessage(), r.fields)
        for r in caplog.records
        if r.name == "orchestrator.engine"
    ]
    assert [(level, msg) for level, msg, _ in lines] == [
        ("INFO", f"run {good.run_id} started: create on m1"),
        ("INFO", f"run {good.run_id} succeeded: create on m1"),
        ("INFO", f"run {bad.run_id} started: start on m1"),
        ("WARNING", f"run {bad.run_id} failed: start on m1: image not found (step boom)"),
    ]
    assert lines[-1][2]["run_id"] == bad.run_id and lines[-1][2]["machine_id"] == "m1"
    assert lines[-1][2]["error"]["kind"] == "abort"
