"""The CLI as real processes: ``corrosion agent`` started as a subprocess serves the API, admin
socket and metrics, replicates with another agent, logs JSON, and leaves the cluster on SIGTERM;
``corrosion devcluster`` stops cleanly on Ctrl-C (SIGINT); a bad config exits non-zero."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from cli_helpers import agent_started, json_logs, node_mapping, rows, short_tmp, write_config
from support import Proc, wait_for

from corrosion import Agent, Config

pytestmark = pytest.mark.anyio

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def corrosion_cmd() -> list[str]:
    """The installed console script when present, else the module."""
    script = shutil.which("corrosion")
    return [script] if script else [sys.executable, "-m", "corrosion"]


async def run(*args: str) -> subprocess.CompletedProcess:
    return await anyio.run_process([*corrosion_cmd(), *args], check=False, env=ENV)


async def test_agent_process_serves_replicates_and_leaves_on_sigterm():
    with short_tmp() as base:
        data = node_mapping(
            base, "a", log={"format": "json"}, telemetry={"prometheus": {"addr": "127.0.0.1:0"}}
        )
        cfg = write_config(base / "a.toml", data)

        bad = write_config(base / "bad.toml", {**data, "gossip": {"addr": "127.0.0.1:0", "x": 1}})
        result = await run("agent", "-c", str(bad))
        assert result.returncode == 1
        assert b"gossip.x" in result.stderr

        proc = Proc([sys.executable, "-m", "corrosion", "-c", str(cfg), "agent"], base)
        try:
            started = await agent_started(proc)
            assert started["level"] == "INFO" and started["target"] == "corrosion.agent"
            api, gossip = started["api_addrs"][0], started["gossip_addr"]

            result = await run(
                "--api-addr", api, "exec", "INSERT INTO todos (id, title) VALUES (1, 'p')"
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"Rows affected: 1\n"
            result = await run("-c", str(cfg), "sync", "generate")
            assert json.loads(result.stdout)["actor_id"] == started["actor_id"]

            b_data = node_mapping(base, "b", [gossip])
            async with Agent(Config.from_mapping(b_data)) as b:
                await wait_for(lambda: rows(b, "SELECT title FROM todos"), what="replication to b")
                assert await rows(b, "SELECT title FROM todos") == [("p",)]
                await b.execute(["INSERT INTO todos (id, title) VALUES (2, 'from b')"])
                want = "1|p\n2|from b\n"

                async def replicated_back() -> bool:
                    got = await run(
                        "query", "--api-addr", api, "SELECT id, title FROM todos ORDER BY id"
                    )
                    return got.returncode == 0 and got.stdout.decode() == want

                await wait_for(replicated_back, what="b's write on the agent process")
                result = await run("cluster", "members", "--json", "-c", str(cfg))
                members = json.loads(result.stdout)
                assert [(m["actor_id"], m["self"]) for m in members] == [
                    (started["actor_id"], True),
                    (b.actor_id.hex(), False),
                ]

                host, port = started["metrics_addr"].split(":")
                async with httpx.AsyncClient(timeout=30) as client:
                    metrics = (await client.get(f"http://{host}:{port}/metrics")).text
                assert re.search(r"^corro_gossip_members 1$", metrics, re.M)

                proc.p.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0, proc.stderr()

                def left() -> bool:
                    return any(m.state == "left" for m in b.members())

                await wait_for(left, what="b to see the agent leave (not fail)")
            msgs = [rec["msg"] for rec in json_logs(proc.stderr())]
            assert "SIGTERM received: leaving the cluster" in msgs
            assert msgs[-1] == "agent stopped"
            assert not Path(data["admin"]["path"]).exists()
        finally:
            proc.kill()


async def test_devcluster_process_stops_on_ctrl_c():
    with short_tmp() as base:
        proc = Proc([*corrosion_cmd(), "devcluster", "--nodes", "2"], base)
        try:
            await wait_for(
                lambda: proc.p.poll() is not None or "Running until Ctrl-C." in proc.stdout(),
                what="the devcluster to come up",
            )
            out = proc.stdout()
            assert proc.p.poll() is None, out + proc.stderr()
            data_dir = Path(re.search(r"data in (\S+)", out)[1])
            assert data_dir.exists()
            # run the printed query command as a newcomer would copy it
            line = next(
                ln.strip()
                for ln in out.splitlines()
                if ln.strip().startswith("corrosion --api-addr") and " query " in ln
            )
            args = shlex.split(line)[1:]
            result = await run(*args)
            assert result.returncode == 0, result.stderr
            assert b"hello from n1" in result.stdout
            proc.p.send_signal(signal.SIGINT)
            assert await proc.wait() == 0, proc.stderr()
            assert "Stopping (SIGINT)" in proc.stdout()
            assert proc.stdout().rstrip().endswith("Stopped.")
            assert not data_dir.exists()  # the temporary data dir is removed
        finally:
            proc.kill()


async def test_a_minimal_config_needs_a_key_or_plaintext():
    """A user's first config (db.path and gossip.addr only) fails in one line that names the
    key and the remedy; with a key from ``corrosion keygen`` the agent starts; with
    ``plaintext = true`` it starts and warns once."""
    with short_tmp() as base:
        minimal = f'[db]\npath = "{base}/state.db"\n\n[gossip]\naddr = "127.0.0.1:0"\n'
        cfg = base / "config.toml"
        cfg.write_text(minimal)
        result = await run("agent", "-c", str(cfg))
        assert result.returncode == 1
        assert result.stderr.decode() == (
            "error: invalid config: gossip.encryption_keys: required, or gossip.plaintext = "
            "true to let anything that reaches the gossip port join and write; generate a key "
            "with `corrosion keygen`\n"
        )
        assert not (base / "state.db").exists()

        keys = [(await run("keygen")).stdout.decode().strip() for _ in range(2)]
        assert keys[0] != keys[1] and all(
            len(base64.b64decode(k, validate=True)) == 32 for k in keys
        )
        for extra, warning in [
            (f"encryption_keys = [{json.dumps(keys[0])}]\n", None),
            ("plaintext = true\n", "gossip.plaintext = true: gossip on 127.0.0.1:"),
        ]:
            cfg.write_text(minimal + extra + '\n[log]\nformat = "json"\n')
            proc = Proc([*corrosion_cmd(), "-c", str(cfg), "agent"], base)
            try:
                await wait_for(
                    lambda proc=proc: (
                        proc.p.poll() is not None
                        or any(r["msg"] == "agent started" for r in json_logs(proc.stderr()))
                    ),
                    what="the agent to start",
                )
                assert proc.p.poll() is None, proc.stderr()
                proc.p.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0, proc.stderr()
            finally:
                proc.kill()
            warned = [r["msg"] for r in json_logs(proc.stderr()) if r["level"] == "WARNING"]
            if warning is None:
                assert warned == []
            else:
                assert len(warned) == 1 and warned[0].startswith(warning)
                assert ":0 " not in warned[0]  # the bound port, not the configured 0


async def test_agent_process_hosts_the_orchestrator_its_config_names():
    """``corrosion agent`` finds the extension for ``[orchestrator]`` through its entry point
    (corrosion imports nothing of the orchestrator): the Machines API answers next to the API.
    An invalid table fails at start-up in one line naming the key, before anything is opened."""
    with short_tmp() as base:
        data = node_mapping(base, "a", log={"format": "json"})
        bad = write_config(base / "bad.toml", {**data, "orchestrator": {"driver": "fake"}})
        result = await run("agent", "-c", str(bad))
        assert result.returncode == 1
        assert result.stderr.decode() == (
            "error: invalid config: [orchestrator]: machines_path is required\n"
        )
        assert not Path(data["db"]["path"]).exists()

        orch = {"machines_path": str(base / "machines"), "driver": "fake", "worker": "w1"}
        cfg = write_config(base / "a.toml", {**data, "orchestrator": orch})
        proc = Proc([*corrosion_cmd(), "-c", str(cfg), "agent"], base)
        try:
            started = await agent_started(proc)
            assert started["extensions"] == ["orchestrator"]
            api = started["api_addrs"][0]
            async with httpx.AsyncClient(base_url=f"http://{api}", timeout=30) as client:
                resp = await client.get("/v1/apps/web/machines")
                assert resp.status_code == 200 and resp.json() == [], resp.text
                assert (await client.get("/v1/health")).status_code == 200
            proc.p.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0, proc.stderr()
        finally:
            proc.kill()
