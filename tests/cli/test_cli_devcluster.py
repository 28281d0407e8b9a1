"""``corrosion devcluster``: N agents on loopback, a demo row read back from every node, the
addresses and commands printed, the per-node config files usable by the CLI."""

from __future__ import annotations

import re

import pytest
from cli_helpers import cli, short_tmp
from typer.testing import CliRunner

from corrosion import Config
from corrosion.ops.cli import app
from corrosion.ops.devcluster import DevCluster

pytestmark = pytest.mark.anyio


def test_devcluster_command_prints_what_a_newcomer_needs():
    with short_tmp() as base:
        runner = CliRunner()
        args = ["devcluster", "--nodes", "3", "--duration", "0.5", "--base-dir", str(base)]
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert "Starting 3 corrosion agent(s)" in out
        assert "CREATE TABLE IF NOT EXISTS todos" in out
        assert "Gossip: encrypted with a key generated for this run" in out
        assert "Membership: all 3 nodes see each other" in out
        assert "Demo: n1 wrote todo #1 'hello from n1'" in out
        assert "\nDemo write reached 3 of 3 nodes.\n" in out  # what the fresh-install smoke checks
        keys = set()
        for name in ("n1", "n2", "n3"):
            assert re.search(rf"^  {name}  \d+\.\d{{3}}s$", out, re.M), out
            cfg = Config.load(base / name / "config.toml")
            assert cfg.db.path == base.resolve() / name / "state.db"
            assert cfg.admin_path is not None and cfg.prometheus_addr is not None
            # secure out of the box: one generated gossip key shared by the nodes, no warning
            assert not cfg.gossip.plaintext and len(cfg.gossip.encryption_keys) == 1
            keys.add(cfg.gossip.encryption_keys[0])
        assert len(keys) == 1
        assert "WARNING" not in result.stderr
        apis = re.findall(r"http://127\.0\.0\.1:(\d+) ", out)
        assert len(set(apis)) >= 3
        assert "curl -s -X POST http://127.0.0.1:" in out
        assert "/v1/transactions" in out and "/v1/queries" in out
        assert "corrosion --api-addr 127.0.0.1:" in out
        assert "cluster members" in out and "/metrics" in out
        assert out.rstrip().endswith("Stopped.")
        assert not any(base.glob("*/admin.sock"))  # sockets cleaned up

        # the data persists in --base-dir: a second run continues from it, with the same key
        # and (free) ports, so the commands printed the first time still work and no node
        # looks for members at ports they no longer have
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "Demo: n1 wrote todo #2" in result.stdout
        assert "Gossip: encrypted with the key of the earlier run" in result.stdout
        assert "WARNING" not in result.stderr, result.stderr
        again = {Config.load(base / name / "config.toml").gossip.encryption_keys[0]
                 for name in ("n1", "n2", "n3")}  # fmt: skip
        assert again == keys
        assert sorted(re.findall(r"http://127\.0\.0\.1:(\d+) ", result.stdout)) == sorted(apis)


def test_devcluster_refusing_the_environment_says_so_in_one_line():
    """A bad OTEL_* variable (the agents refuse it at start) is one line, not a traceback."""
    with short_tmp() as base:
        args = ["devcluster", "--nodes", "1", "--duration", "0.5", "--base-dir", str(base)]
        result = CliRunner().invoke(app, args, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://x"})
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert result.stderr.strip().splitlines() == [
            "error: devcluster could not start: OTEL_EXPORTER_OTLP_ENDPOINT=ftp://x: expected "
            "the http:// or https:// URL of an OTLP/HTTP collector (e.g. http://localhost:4318)"
        ]


async def test_devcluster_nodes_answer_the_printed_commands():
    with short_tmp() as base:
        async with DevCluster(2, base) as dc:
            assert await dc.wait_joined() is not None
            todo_id, _title, seen = await dc.demo_write()
            assert todo_id == 1
            assert all(secs is not None for _name, secs in seen)
            n1, n2 = dc.nodes
            result = await cli("--api-addr", n1.api, "exec", "--param", "7", "--param", "walk",
                               "INSERT INTO todos (id, title) VALUES (?, ?)")  # fmt: skip
            assert result.exit_code == 0, result.output
            result = await cli("-c", str(n2.config_path), "cluster", "members")
            assert result.exit_code == 0, result.output
            assert n1.agent.actor_id.hex() in result.stdout
            result = await cli(
                "-c", str(n1.config_path), "query", "SELECT title FROM todos WHERE id = 7"
            )
            assert result.stdout == "walk\n"
