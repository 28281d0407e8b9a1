"""``corrosion schema apply`` / ``schema show`` and ``POST /v1/schema`` as an operator uses them:
a change proposed on one node reaches the other; refusals (invalid, destructive without the
flag, bad requests) change nothing and say why; drift between a node's files and the cluster
schema is reported; ``cluster members`` shows each member's version."""

from __future__ import annotations

import httpx
import pytest
from cli_helpers import api_of, cli, gossip_of, node_mapping, write_schema
from support import wait_for

from corrosion import Agent, Config

pytestmark = pytest.mark.anyio

SCHEMA = "CREATE TABLE todos (id INTEGER NOT NULL PRIMARY KEY, title TEXT NOT NULL DEFAULT '');\n"
WITH_COLOR = SCHEMA.replace("DEFAULT '')", "DEFAULT '', color TEXT)")


def columns(agent: Agent) -> list[str]:
    assert agent.store is not None
    return [r[1] for r in agent.store.conn.execute("PRAGMA table_info(todos)")]


async def test_schema_apply_reaches_the_cluster_and_refusals_change_nothing(tmp_path):
    cfg_a = Config.from_mapping(node_mapping(tmp_path, "a"))
    write_schema(tmp_path, SCHEMA)  # both nodes' files
    async with Agent(cfg_a) as a:
        mapping_b = node_mapping(tmp_path, "b", [gossip_of(a)])
        write_schema(tmp_path, SCHEMA)
        async with Agent(Config.from_mapping(mapping_b)) as b:
            await wait_for(lambda: a.alive_members() == 1, what="a and b to meet")
            sock = str(a.config.admin_path)
            new = tmp_path / "new" / "todos.sql"
            new.parent.mkdir()
            new.write_text(WITH_COLOR)
            result = await cli("schema", "apply", str(new), "--admin-path", sock)
            assert result.exit_code == 0, result.output
            lines = result.stdout.splitlines()
            assert lines[0] == "applied: added column todos.color"
            assert (
                lines[1].startswith("proposed version 1 (") and lines[2] == "every member runs it"
            )
            assert "color" in columns(b)

            # the cluster schema is what `show` prints; b's files now differ from it: drift
            shown = await cli("schema", "show", "--admin-path", str(b.config.admin_path))
            assert WITH_COLOR.strip() in shown.stdout and "this node runs version 1" in shown.stdout
            assert "drift: the schema files differ from cluster schema version 1" in shown.stdout
            members = await cli("cluster", "members", "--admin-path", sock)
            assert [line.split()[5] for line in members.stdout.splitlines()[1:]] == ["v1", "v1"]

            # destructive without the flag: refused, nothing written, the flag named
            new.write_text(SCHEMA)
            result = await cli("schema", "apply", str(new), "--admin-path", sock)
            assert result.exit_code == 1
            assert result.stderr.startswith(
                "error: column 'color' of table 'todos' would be dropped; "
            )
            assert "`corrosion schema apply --allow-destructive`" in result.stderr
            assert a.schema.status.running.version == 1 and "color" in columns(a)

            # an invalid schema: refused before anything is touched
            new.write_text("CREATE TABLE broken (")
            result = await cli("schema", "apply", str(new), "--admin-path", sock)
            assert result.exit_code == 1
            assert result.stderr.startswith(f"error: {new}: invalid schema statement")
            missing = await cli(
                "schema", "apply", str(tmp_path / "nowhere.sql"), "--admin-path", sock
            )
            assert missing.exit_code == 1 and "does not exist" in missing.stderr

            # over HTTP: bad requests are 400s that say what is wrong
            async with httpx.AsyncClient(base_url=f"http://{api_of(a)}", timeout=60) as h:
                for body, said in [
                    ({}, '"schema" must be the schema text'),
                    ({"schema": SCHEMA, "wait": -1}, '"wait" must be a number'),
                    ({"schema": SCHEMA, "allow_destructive": "yes"}, "true or false"),
                    ({"schema": SCHEMA, "bogus": 1}, "unknown field 'bogus'"),
                    ({"schema": SCHEMA}, "would be dropped"),
                ]:
                    resp = await h.post("/v1/schema", json=body)
                    assert resp.status_code == 400 and said in resp.json()["error"], resp.text
                # with the flag, the drop is version 2, applied on b too
                resp = await h.post(
                    "/v1/schema", json={"schema": SCHEMA, "allow_destructive": True, "wait": 60}
                )
                assert resp.status_code == 200, resp.text
                assert resp.json()["version"] == 2 and resp.json()["destructive"] is True
                assert resp.json()["unconfirmed"] == []
            assert "color" not in columns(b)
            async with httpx.AsyncClient(base_url=f"http://{api_of(b)}", timeout=60) as h:
                health = (await h.get("/v1/health")).json()["response"]["schema"]
            assert health["version"] == 2 and health["drift"] is None  # b's files say this
