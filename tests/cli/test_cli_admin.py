"""The admin socket: its JSON-lines protocol (on asyncio and trio), bad input answered with
errors, socket file life cycle, and the CLI commands that use it."""

from __future__ import annotations

import json
import socket

import anyio
import pytest
from cli_helpers import SCHEMA, cli, cluster, gossip_of, node_mapping, rows, write_schema
from support import wait_for

from corrosion import Agent, Config
from corrosion.surfaces.admin_client import MAX_LINE, AdminError, admin_request, agent_listening

pytestmark = pytest.mark.anyio


class Conn:
    """A raw admin connection, to send arbitrary bytes (blocking; used from a worker thread)."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict | None:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


async def ask(path, cmd, **args):
    return await anyio.to_thread.run_sync(lambda: admin_request(path, cmd, **args))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_commands_answer_on_both_backends(base, anyio_backend):
    cfg = Config.from_mapping(node_mapping(base, "a", api=None))
    async with Agent(cfg, serve_api=False) as agent:
        sock = cfg.admin_path
        assert await ask(sock, "ping") == "pong"
        health = await ask(sock, "health")
        assert health == {
            "actor_id": agent.actor_id.hex(),
            "gaps": 0,
            "members": 0,
            "p99_lag": 0.0,
            "queue_size": 0,
            "pending_schema": {"versions": 0, "missing": {}},
            "not_in_schema": [],
        }
        await agent.execute(["INSERT INTO todos (id) VALUES (1)"])
        state = await ask(sock, "sync generate")
        assert state["actor_id"] == agent.actor_id.hex()
        assert state["heads"] == {agent.actor_id.hex(): 1}
        (own,) = await ask(sock, "cluster members")
        assert (own["actor_id"], own["self"], own["state"]) == (agent.actor_id.hex(), True, "alive")
    assert not sock.exists()  # removed on close


async def test_bad_input_gets_error_replies_and_the_socket_survives(base):
    cfg = Config.from_mapping(node_mapping(base, "a"))
    async with Agent(cfg):

        def talk() -> list[dict | None]:
            c = Conn(cfg.admin_path)
            try:
                out = []
                for line in [
                    b"this is not json\n",
                    b"[1, 2, 3]\n",
                    b'{"command": "ping"}\n',
                    b'{"cmd": 42}\n',
                    b'{"cmd": "rm -rf /"}\n',
                    b'{"cmd": "ping", "extra": true}\n',
                    b'{"cmd": "reload", "allow_destructive": "yes"}\n',
                    b"\xff\xfe\n",
                    b"\n\n",  # blank lines are skipped, no reply
                    b'{"cmd": "ping"}\n',
                ]:
                    c.send(line)
                for _ in range(9):
                    out.append(c.reply())
                return out
            finally:
                c.close()

        replies = await anyio.to_thread.run_sync(talk)
        assert all(r is not None for r in replies)
        assert [r["ok"] for r in replies] == [False] * 8 + [True]
        assert "not valid JSON" in replies[0]["error"]
        assert "JSON object" in replies[1]["error"]
        assert '"cmd"' in replies[2]["error"]
        assert "unknown command 'rm -rf /'" in replies[4]["error"]
        assert "'extra'" in replies[5]["error"]
        assert "allow_destructive" in replies[6]["error"]
        assert replies[8]["result"] == "pong"

        def oversize() -> tuple[dict | None, dict | None]:
            c = Conn(cfg.admin_path)
            try:
                c.send(b"x" * (MAX_LINE + 70_000))
                first = c.reply()
                return first, c.reply()
            except OSError:  # the server may close before reading everything we sent
                return {"ok": False, "error": "reset"}, None
            finally:
                c.close()

        first, after = await anyio.to_thread.run_sync(oversize)
        assert first["ok"] is False and after is None  # answered, then closed
        # a client that vanishes mid-request does not disturb anything
        c = await anyio.to_thread.run_sync(Conn, cfg.admin_path)
        await anyio.to_thread.run_sync(c.send, b'{"cmd": "pi')
        c.close()
        assert await ask(cfg.admin_path, "ping") == "pong"
        with pytest.raises(AdminError, match="unknown command"):
            await ask(cfg.admin_path, "Sync")


async def test_socket_file_life_cycle(base):
    data = node_mapping(base, "a", api=None)
    sock = base / "a.sock"
    # a stale socket file (its agent died) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert sock.exists() and not agent_listening(sock)
    async with Agent(Config.from_mapping(data), serve_api=False):
        assert agent_listening(sock)
        # a second agent on the same socket is refused: the first one answers there
        other = node_mapping(base, "b", api=None)
        other["admin"]["path"] = str(sock)
        with pytest.raises(ValueError, match="another agent is listening"):
            async with Agent(Config.from_mapping(other), serve_api=False):
                pass
        assert await ask(sock, "ping") == "pong"
    assert not sock.exists()
    # a regular file at the path is never deleted
    sock.write_text("not a socket")
    with pytest.raises(ValueError, match="not a socket"):
        async with Agent(Config.from_mapping(data), serve_api=False):
            pass
    assert sock.read_text() == "not a socket"


async def test_cli_cluster_members_and_sync_generate(base):
    async with cluster(base, 3) as agents:
        a, b, c = agents
        await b.execute(["INSERT INTO todos (id, title) VALUES (1, 'x')"])
        await wait_for(
            lambda: a.sync_state()["heads"].get(b.actor_id.hex()) == 1, what="replication to a"
        )
        sock = str(a.config.admin_path)
        result = await cli("cluster", "members", "--admin-path", sock)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split() == [
            "ACTOR",
            "ID",
            "GOSSIP",
            "ADDR",
            "PEER",
            "ADDR",
            "STATE",
            "INCARNATION",
            "SCHEMA",
        ]
        listed = {line.split()[0]: line.split() for line in lines[1:]}
        assert set(listed) == {a.actor_id.hex(), b.actor_id.hex(), c.actor_id.hex()}
        assert lines[1].split()[0] == a.actor_id.hex()  # this node first, marked
        own = listed[a.actor_id.hex()]
        assert own[1:4] == [gossip_of(a), gossip_of(a), "alive"] and own[-1] == "(self)"
        assert listed[b.actor_id.hex()][1] == gossip_of(b)
        assert listed[b.actor_id.hex()][3] == "alive"
        assert len(listed[b.actor_id.hex()]) == 6  # not marked (the last: its schema version)

        result = await cli("--admin-path", sock, "cluster", "members", "--json")
        members = json.loads(result.stdout)
        assert {m["actor_id"]: m["self"] for m in members} == {
            a.actor_id.hex(): True,
            b.actor_id.hex(): False,
            c.actor_id.hex(): False,
        }

        result = await cli("sync", "generate", "--admin-path", sock)
        assert result.exit_code == 0
        state = json.loads(result.stdout)
        assert state["actor_id"] == a.actor_id.hex()
        assert state["heads"] == {b.actor_id.hex(): 1}
        assert state["need"] == {} and state["partial_need"] == {}


async def test_cli_reload_applies_schema_changes(base):
    cfg = Config.from_mapping(node_mapping(base, "a"))
    async with Agent(cfg) as agent:
        sock = str(cfg.admin_path)
        result = await cli("reload", "--admin-path", sock)
        assert result.exit_code == 0
        assert result.stdout == "schema unchanged\n"

        write_schema(
            base, SCHEMA + "\nCREATE TABLE notes (id INTEGER NOT NULL PRIMARY KEY, body TEXT);"
        )
        result = await cli("reload", "--admin-path", sock)
        assert result.exit_code == 0, result.output
        assert "notes" in result.stdout
        await agent.execute(["INSERT INTO notes (id, body) VALUES (1, 'hi')"])
        assert await rows(agent, "SELECT body FROM notes") == [("hi",)]

        # a table the files no longer list is kept and reported; dropping it needs the flag
        write_schema(base, SCHEMA)
        result = await cli("reload", "--admin-path", sock)
        assert result.exit_code == 0, result.output
        assert "left alone (--allow-destructive drops it): notes" in result.stdout
        assert await rows(agent, "SELECT body FROM notes") == [("hi",)]
        assert agent.not_in_schema == ["notes"]
        # kept, it is still a CRR: writes are accepted and booked as versions to replicate
        kept = await agent.execute(["INSERT INTO notes (id, body) VALUES (2, 'kept')"])
        assert kept.version is not None
        result = await cli("reload", "--allow-destructive", "--admin-path", sock)
        assert result.exit_code == 0, result.output
        tables = await rows(agent, "SELECT name FROM sqlite_schema WHERE name = 'notes'")
        assert tables == []

        # a broken schema file is an error reply naming the file; the agent keeps running
        schema = write_schema(base, "CREATE TABLE broken (")
        result = await cli("reload", "--admin-path", sock)
        assert result.exit_code == 1
        assert result.stderr == (
            f"error: {schema}: invalid schema statement (incomplete input): CREATE TABLE broken (\n"
        )
        assert await ask(sock, "ping") == "pong"
        # a change that loses data names the flag that allows it, as the CLI spells it
        write_schema(base, SCHEMA.replace("    data BLOB\n", "    data_ BLOB\n"))
        result = await cli("reload", "--admin-path", sock)
        assert result.exit_code == 1
        assert result.stderr.startswith("error: column 'data' of table 'todos' would be dropped; ")
        assert "`corrosion reload --allow-destructive`" in result.stderr
        assert "`corrosion agent --allow-destructive`" in result.stderr
        assert "allow_destructive" not in result.stderr


async def test_admin_commands_say_when_the_named_config_does_not_load(base):
    """The admin socket's path comes from the config: a config named with -c that is missing
    or invalid is said in one line, not replaced by the default socket (another agent's, or
    none, which read as "is the agent running?")."""
    missing = base / "missing.toml"
    result = await cli("-c", str(missing), "cluster", "members")
    assert result.exit_code == 1
    assert result.stderr == f"error: config file '{missing}' does not exist\n"
    bad = base / "bad.toml"
    bad.write_text('[db]\npath = "state.db"\n[api]\naddr = "nowhere"\n')
    result = await cli("-c", str(bad), "sync", "generate")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: invalid config: api.addr")
    assert "admin.sock" not in result.stderr
