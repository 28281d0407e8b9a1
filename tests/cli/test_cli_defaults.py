"""Without an ``[admin]`` section an agent still has its admin socket (beside the database), so
``corrosion cluster members`` / ``reload`` work from the config alone; one agent per database
(a second is refused); ``restore`` refuses over a running agent even when no socket answers."""

from __future__ import annotations

import pytest
from cli_helpers import cli, node_mapping, short_tmp, to_toml

from corrosion import Agent, Config
from corrosion.runtime.dblock import DatabaseInUse

pytestmark = pytest.mark.anyio


async def test_default_admin_socket_serves_the_cli():
    with short_tmp() as base:
        data = node_mapping(base, "a", admin=None)
        cfg_file = base / "a.toml"
        cfg_file.write_text(to_toml(data))
        cfg = Config.from_mapping(data)
        assert cfg.admin_path is None
        async with Agent(cfg) as agent:
            sock = cfg.admin_socket()
            assert sock == base / "a" / "state.db.admin.sock" and sock.is_socket()
            result = await cli("-c", str(cfg_file), "cluster", "members")
            assert result.exit_code == 0, result.output
            result = await cli("-c", str(cfg_file), "sync", "generate")
            assert result.exit_code == 0, result.output
            assert agent.actor_id.hex() in result.stdout
        assert not sock.exists()


async def test_one_agent_per_database_and_restore_checks_the_lock():
    with short_tmp() as base:
        data = node_mapping(base, "a", admin=None)
        async with Agent(Config.from_mapping(data)) as agent:
            await agent.execute(["INSERT INTO todos (id, title) VALUES (1, 'x')"])
            other = dict(data, gossip=dict(data["gossip"]), api=dict(data["api"]))
            with pytest.raises(DatabaseInUse, match="in use by a running agent"):
                async with Agent(Config.from_mapping(other)):
                    pass
            backup = base / "b.db"
            result = await cli("backup", str(backup), "--db-path", data["db"]["path"])
            assert result.exit_code == 0, result.output
            # no admin socket given or found: the database lock alone tells an agent runs
            result = await cli(
                "restore", str(backup), "--db-path", data["db"]["path"],
                "--admin-path", str(base / "nothing-here.sock"),
            )  # fmt: skip
            assert result.exit_code == 1
            assert "agent is running" in result.stderr
            assert agent.gaps() == 0
        # stopped: the lock is free again and restore goes ahead
        result = await cli("restore", str(backup), "--db-path", data["db"]["path"])
        assert result.exit_code == 0, result.output
