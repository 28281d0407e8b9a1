"""``corrosion devcluster``: N real agents on loopback in one process, for a first look.

Each node is a full agent (SWIM on UDP, peer streams on TCP, HTTP API, admin socket, metrics)
with its own database under ``<base>/n<i>/``, all joined through n1 and sharing a demo schema
(a ``todos`` table). The command writes a row through n1, shows how long it took to become
visible on every node, prints the addresses with commands to copy, and runs until Ctrl-C (or for
``--duration`` seconds). It exits non-zero if the demo write never reached some node.

Every node also gets a ``config.toml`` (with the ports actually bound), so the CLI can reach it
with ``corrosion -c <base>/n2/config.toml ...`` while the cluster runs. The nodes share a gossip
key generated for this cluster (written into those files), as every agent needs one. Run again
on a kept ``--base-dir``, the cluster takes its key and ports from those files (a port taken
meanwhile is picked anew), so the commands printed last time still work and each node rejoins
the members it remembers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..agent import Agent
from ..config import Config, generate_key
from ..surfaces.admin_client import MAX_SOCKET_PATH
from .startup import bind_probe

DEMO_SCHEMA = """\
CREATE TABLE IF NOT EXISTS todos (
    id INTEGER NOT NULL PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    node TEXT
);
"""

HOST = "127.0.0.1"


def _addr(a: tuple[str, int]) -> str:
    return f"{a[0]}:{a[1]}"


def _toml(value: Any) -> str:
    # JSON strings, numbers, booleans and arrays are valid TOML values
    return json.dumps(value)


@dataclass
class Node:
    name: str
    agent: Agent
    config_path: Path

    @property
    def api(self) -> str:
        return _addr(self.agent.api_addrs[0])

    @property
    def metrics(self) -> str | None:
        addr = self.agent.metrics_addr
        return _addr(addr) if addr else None


class DevCluster:
    """The nodes, as an async context manager (stops them all, leaving the cluster)."""

    def __init__(self, nodes: int, base_dir: Path) -> None:
        if nodes < 1:
            raise ValueError("a devcluster needs at least one node")
        self.size = nodes
        self.base = base_dir
        self.schema_path = base_dir / "schema" / "todos.sql"
        self.nodes: list[Node] = []
        self._previous = {
            f"n{i}": _previous_config(base_dir / f"n{i}") for i in range(1, nodes + 1)
        }
        keys = [
            k for c in self._previous.values() for k in _get(c, "gossip", "encryption_keys") or []
        ]
        self.gossip_key = keys[0] if keys else generate_key()
        self.reused = bool(keys)  # the key (and free ports) of an earlier run in base_dir
        self._stack = contextlib.AsyncExitStack()
        self._socket_dir: Path | None = None

    def _admin_path(self, name: str) -> Path:
        path = self.base / name / "admin.sock"
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
            return path
        if self._socket_dir is None:  # Unix socket paths are short; fall back to /tmp
            self._socket_dir = Path(tempfile.mkdtemp(prefix="corro-"))
        return self._socket_dir / f"{name}.sock"

    def _config(self, name: str, seeds: list[str]) -> dict[str, Any]:
        return {
            "db": {
                "path": str(self.base / name / "state.db"),
                "schema_paths": [str(self.schema_path)],
            },
            "api": {"addr": self._again(name, ("api", "addr"), socket.SOCK_STREAM)},
            "gossip": {
                "addr": self._again(
                    name, ("gossip", "addr"), socket.SOCK_DGRAM, socket.SOCK_STREAM
                ),
                "bootstrap": seeds,
                "preset": "local",
                "encryption_keys": [self.gossip_key],
            },
            "perf": {"min_sync_backoff": 0.5, "max_sync_backoff": 5.0},
            "admin": {"path": str(self._admin_path(name))},
            "telemetry": {
                "prometheus": {
                    "addr": self._again(
                        name, ("telemetry", "prometheus", "addr"), socket.SOCK_STREAM
                    )
                }
            },
        }

    def _again(self, name: str, key: tuple[str, ...], *kinds: socket.SocketKind) -> str:
        """The address ``name`` had at ``key`` in an earlier run, if its port is free now; else
        port 0 (the system picks one)."""
        addr = _get(self._previous[name], *key)
        if isinstance(addr, str) and addr.startswith(f"{HOST}:"):
            port = addr.rpartition(":")[2]
            if port.isdigit() and _free(int(port), kinds):
                return addr
        return f"{HOST}:0"

    async def __aenter__(self) -> DevCluster:
        self.schema_path.parent.mkdir(parents=True, exist_ok=True)
        self.schema_path.write_text(DEMO_SCHEMA)
        try:
            seeds: list[str] = []
            for i in range(1, self.size + 1):
                name = f"n{i}"
                data = self._config(name, seeds)
                agent = await self._stack.enter_async_context(Agent(Config.from_mapping(data)))
                if not seeds:
                    assert agent.swim is not None  # started
                    seeds = [_addr(agent.swim.address)]
                cfg_path = self.base / name / "config.toml"
                _write_config(cfg_path, data, agent)
                self.nodes.append(Node(name, agent, cfg_path))
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        # no cancel scope around this: each agent's task group was entered in this task and
        # must be exited with its own scope innermost (the agents shield their shutdown)
        await self._stack.aclose()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    async def wait_joined(self, timeout: float = 30.0) -> float | None:
        """Seconds until every node sees all the others alive; None after ``timeout``."""
        t0 = time.perf_counter()
        with anyio.move_on_after(timeout):
            while lagging := [n for n in self.nodes if n.agent.alive_members() < self.size - 1]:
                agent = lagging[0].agent
                assert agent.swim is not None
                with agent.swim.subscribe() as changes:  # each membership change is notified
                    if agent.alive_members() < self.size - 1:
                        await changes.receive()
            return time.perf_counter() - t0
        return None

    async def demo_write(
        self, timeout: float = 30.0
    ) -> tuple[int, str, list[tuple[str, float | None]]]:
        """Write a todo through n1; return (id, title, [(node, seconds until visible)])."""
        first = self.nodes[0]
        rows = [r async for r in first.agent.query("SELECT coalesce(max(id), 0) + 1 FROM todos")]
        todo_id = int(rows[0][0])
        title = f"hello from {first.name}"
        await first.agent.execute(
            [
                [
                    "INSERT INTO todos (id, title, node) VALUES (?, ?, ?)",
                    [todo_id, title, first.name],
                ]
            ]
        )
        t0 = time.perf_counter()
        seen: dict[str, float | None] = {n.name: None for n in self.nodes}

        async def watch(node: Node) -> None:
            while True:
                got = [
                    r async for r in node.agent.query("SELECT 1 FROM todos WHERE id = ?", [todo_id])
                ]
                if got:
                    seen[node.name] = time.perf_counter() - t0
                    return
                await anyio.sleep(0.005)

        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                for node in self.nodes:
                    tg.start_soon(watch, node)
        return todo_id, title, list(seen.items())


def _previous_config(node_dir: Path) -> dict[str, Any]:
    """The config an earlier run wrote for a node (empty when none, or unreadable)."""
    try:
        return tomllib.loads((node_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _get(data: Any, *keys: str) -> Any:
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data


def _free(port: int, kinds: tuple[socket.SocketKind, ...]) -> bool:
    """Whether ``port`` can be bound on HOST for each socket kind."""
    try:
        for kind in kinds:
            bind_probe(HOST, port, kind)
    except OSError:
        return False
    return True


def _write_config(path: Path, data: dict[str, Any], agent: Agent) -> None:
    """The node's config with its bound ports, for the CLI (``corrosion -c path ...``)."""
    db, gossip = data["db"], data["gossip"]
    metrics = agent.metrics_addr
    assert agent.swim is not None  # started
    lines = [
        "# Written by `corrosion devcluster`: this node's settings with the ports it bound,",
        "# so `corrosion -c <this file> ...` reaches it while the devcluster runs.",
        "[db]",
        f"path = {_toml(db['path'])}",
        f"schema_paths = {_toml(db['schema_paths'])}",
        "",
        "[api]",
        f"addr = {_toml(_addr(agent.api_addrs[0]))}",
        "",
        "[gossip]",
        f"addr = {_toml(_addr(agent.swim.address))}",
        f"bootstrap = {_toml(gossip['bootstrap'])}",
        f"preset = {_toml(gossip['preset'])}",
        f"encryption_keys = {_toml(gossip['encryption_keys'])}",
        "",
        "[admin]",
        f"path = {_toml(data['admin']['path'])}",
    ]
    if metrics:
        lines += ["", "[telemetry]", f"prometheus.addr = {_toml(_addr(metrics))}"]
    path.touch(mode=0o600)  # it holds the cluster's gossip key
    path.write_text("\n".join(lines) + "\n")


def describe(cluster: DevCluster, cli: str = "corrosion") -> list[str]:
    """The node table and copy-pasteable commands."""
    nodes = cluster.nodes
    rows = [("node", "actor id", "HTTP API", "gossip", "metrics", "config (for -c)")]
    for n in nodes:
        assert n.agent.swim is not None  # started
        rows.append(
            (
                n.name,
                n.agent.actor_id.hex(),
                f"http://{n.api}",
                _addr(n.agent.swim.address),
                f"http://{n.metrics}/metrics" if n.metrics else "-",
                str(n.config_path),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    first, last = nodes[0], nodes[-1]
    insert = json.dumps([["INSERT INTO todos (id, title) VALUES (?, ?)", [1000, "buy milk"]]])
    select = json.dumps("SELECT id, title, done, node FROM todos")
    q = shlex.quote
    out += [
        "",
        "Try it from another terminal:",
        f"  # write through {first.name}'s HTTP API (a JSON array of statements, one transaction)",
        f"  curl -s -X POST http://{first.api}/v1/transactions "
        f"-H 'Content-Type: application/json' -d {q(insert)}",
        f"  # read from {last.name} (NDJSON: columns, one line per row, end of query)",
        f"  curl -s -X POST http://{last.api}/v1/queries "
        f"-H 'Content-Type: application/json' -d {q(select)}",
        "  # the same with the CLI",
        f"  {cli} --api-addr {first.api} exec --param 1001 --param 'walk the dog' "
        f"{q('INSERT INTO todos (id, title) VALUES (?, ?)')}",
        f"  {cli} --api-addr {last.api} query --columns "
        f"{q('SELECT id, title, done, node FROM todos')}",
        "  # operator commands through a node's admin socket",
        f"  {cli} -c {q(str(last.config_path))} cluster members",
        f"  {cli} -c {q(str(last.config_path))} sync generate",
    ]
    if first.metrics:
        out.append(f"  curl -s http://{first.metrics}/metrics | grep '^corro_'")
    return out


async def run_devcluster(
    nodes: int,
    base_dir: Path | None,
    duration: float | None,
    echo: Callable[[str], Any],
    wait: Callable[[float | None], Awaitable[str]],
) -> list[str]:
    """The ``devcluster`` command: start, demonstrate, print, ``wait`` (the CLI's: for a signal
    or ``duration``), stop. Returns the nodes the demo write did not reach (so the command can
    fail: scripts and CI rely on it)."""
    temporary = base_dir is None
    base = Path(tempfile.mkdtemp(prefix="corrosion-devcluster-")) if base_dir is None else base_dir
    base = base.resolve()
    try:
        echo(f"Starting {nodes} corrosion agent(s) on {HOST}; data in {base}")
        if temporary:
            echo("  (a temporary directory, deleted on exit; pass --base-dir to keep the data)")
        async with DevCluster(nodes, base) as cluster:
            echo(f"Schema ({cluster.schema_path}):")
            echo("\n".join("    " + line for line in DEMO_SCHEMA.strip().splitlines()))
            echo("")
            echo("\n".join(describe(cluster)))
            echo("")
            echo(
                "Gossip: encrypted with the key of the earlier run kept in this directory "
                "(gossip.encryption_keys in each config.toml)"
                if cluster.reused
                else "Gossip: encrypted with a key generated for this run "
                "(gossip.encryption_keys in each config.toml)"
            )
            joined = await cluster.wait_joined()
            if nodes == 1:
                echo("Membership: a single node (add --nodes 3 to see replication)")
            elif joined is None:
                echo("Membership: not every node sees the others yet (still trying)")
            else:
                echo(f"Membership: all {nodes} nodes see each other (after {joined:.2f}s)")
            todo_id, title, seen = await cluster.demo_write()
            echo(f"Demo: n1 wrote todo #{todo_id} {title!r}; time until each node could read it:")
            for name, secs in seen:
                took = "not yet (still replicating)" if secs is None else f"{secs:.3f}s"
                echo(f"  {name}  {took}")
            missing = [name for name, secs in seen if secs is None]
            echo(f"Demo write reached {nodes - len(missing)} of {nodes} nodes.")
            echo("")
            echo(
                "Running until Ctrl-C."
                if duration is None
                else f"Running for {duration:g}s (or until Ctrl-C)."
            )
            why = await wait(duration)
            echo(f"Stopping ({why}): the nodes leave the cluster.")
        echo("Stopped.")
    finally:
        if temporary:
            shutil.rmtree(base, ignore_errors=True)
    return missing
