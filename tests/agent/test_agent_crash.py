"""An agent killed with SIGKILL while changes stream in restarts from its database alone and
catches up with zero gaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from agent_helpers import SECURE_GOSSIP, cluster, rows, seed_addr, write_schema
from support import wait_for

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent


class AgentProcess:
    def __init__(self, base: Path, seeds: list[str]) -> None:
        schema = write_schema(base / "schema")
        self.config = base / "proc.json"
        self.config.write_text(
            json.dumps(
                {
                    "db": {"path": str(base / "proc" / "state.db"), "schema_paths": [str(schema)]},
                    "gossip": {
                        "addr": "127.0.0.1:0",
                        "bootstrap": seeds,
                        "preset": "local",
                        **SECURE_GOSSIP,
                    },
                    "api": {"addr": "127.0.0.1:0"},
                    "perf": {"min_sync_backoff": 0.2, "max_sync_backoff": 1.0},
                }
            )
        )
        self.proc: subprocess.Popen | None = None
        self.api = ""

    async def start(self) -> None:
        # Popen only forks and execs; the slow part, the first line, is read in a worker thread
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, str(HERE / "agent_proc.py"), str(self.config)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = await anyio.to_thread.run_sync(self.proc.stdout.readline)
        assert line, "the agent process exited before starting"
        self.api = json.loads(line)["api"]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    async def query(self, sql: str) -> list:
        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(f"http://{self.api}/v1/queries", json=sql)
            lines = [json.loads(x) for x in resp.text.splitlines()]
            return [x["row"][1] for x in lines if "row" in x]

    async def health(self) -> dict:
        async with httpx.AsyncClient(timeout=30) as client:
            return (await client.get(f"http://{self.api}/v1/health")).json()["response"]


async def test_sigkill_mid_stream_then_restart_catches_up(tmp_path):
    async with cluster(tmp_path, 2, with_api=False) as (a, b):
        proc = AgentProcess(tmp_path, [seed_addr(a)])
        try:
            await proc.start()
            await wait_for(lambda: a.alive_members() == 2, what="the process agent to join")
            stop = anyio.Event()

            async def writer() -> None:
                i = 0
                while not stop.is_set():
                    node = (a, b)[i % 2]
                    await node.execute(
                        [
                            [
                                "INSERT INTO items (id, body, owner) VALUES (?, ?, ?)",
                                [i, "x" * (i % 50), "w"],
                            ]
                        ]
                    )
                    i += 1
                    await anyio.sleep(0.005)

            def written() -> int:
                return a.store.bookie.get(a.actor_id).held.max()

            async def more_writes(n: int, what: str) -> None:
                target = written() + n
                await wait_for(lambda: written() >= target, what=what)

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                await more_writes(40, "writes to flow")
                proc.kill()  # mid-stream: broadcasts and applies are in flight
                await more_writes(20, "writes while the process agent is down")
                await proc.start()  # same database, new ports
                await more_writes(40, "writes after its restart")
                stop.set()

            # a and b first agree on everything written: under load b's last writes may still
            # be on their way to a, and a snapshot of a taken then would lack rows the restarted
            # agent does get (from b), so it could never equal it
            async def settled() -> list:
                got = await rows(a, "SELECT id, body FROM items ORDER BY id")
                return got if got == await rows(b, "SELECT id, body FROM items ORDER BY id") else []

            expected = await wait_for(settled, timeout=90, what="a and b to hold the same rows")

            async def caught_up() -> bool:
                got = await proc.query("SELECT id, body FROM items ORDER BY id")
                health = await proc.health()
                return [tuple(r) for r in got] == expected and health["gaps"] == 0

            await wait_for(caught_up, timeout=90, what="the restarted agent to catch up")
        finally:
            proc.stop()
