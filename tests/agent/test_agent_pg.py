"""The PostgreSQL protocol (``api.pg.addr``) with real clients — psql, psycopg 3, asyncpg —
against real agents on loopback: authentication with the API's token, the simple and the
extended query protocol, types, transaction blocks, errors, cancellation, replication, and
bytes that are not the protocol."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psycopg
import pytest
from agent_helpers import agent_config, cluster, rows
from support import require, wait_for

from corrosion import Agent, Config
from corrosion.config import ConfigError, security_warnings
from corrosion.surfaces import pg_protocol as pgp
from corrosion.surfaces.metrics import collect, render
from corrosion.surfaces.pg import infer_param_types

pytestmark = pytest.mark.anyio

TOKEN = "pg-test-token"
EXTRA_SCHEMA = "CREATE TABLE IF NOT EXISTS flags (id INTEGER NOT NULL PRIMARY KEY, on_ BOOLEAN);\n"
LONG_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 4000000000) "
    "SELECT count(*) FROM c"
)


def pg_config(base: Path, name: str = "n0", *, token: str | None = None, **api: Any) -> Config:
    (base / "extra").mkdir(parents=True, exist_ok=True)
    (base / "extra" / "flags.sql").write_text(EXTRA_SCHEMA)
    api_section: dict[str, Any] = {"pg": {"addr": "127.0.0.1:0"}, **api}
    if token:
        api_section["authz"] = {"bearer-token": token}
    cfg = agent_config(base, name, api=api_section)
    schema_paths = (*cfg.db.schema_paths, base / "extra" / "flags.sql")
    return dataclasses.replace(cfg, db=dataclasses.replace(cfg.db, schema_paths=schema_paths))


def dsn(agent: Agent, password: str | None = None) -> str:
    host, port = agent.pg_addrs[0]
    out = f"host={host} port={port} user=tester dbname=corrosion connect_timeout=30"
    return out + (f" password={password}" if password is not None else "")


async def pg_connect(agent: Agent, password: str | None = None) -> asyncpg.Connection:
    host, port = agent.pg_addrs[0]
    return await asyncpg.connect(
        host=host, port=port, user="tester", password=password, database="corrosion", ssl=False
    )


def psql_or_skip() -> str:
    path = shutil.which("psql")
    if path is None and os.geteuid() == 0:
        pytest.fail("psql is missing: scripts/setup-test-deps installs it (postgresql-client)")
    require(None if path else "psql is not installed", "CORROSION_REQUIRE_PSQL")
    assert path is not None
    return path


async def psql(agent: Agent, *args: str, password: str | None = TOKEN) -> tuple[int, str, str]:
    host, port = agent.pg_addrs[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {"PGCONNECT_TIMEOUT": "30", "PGAPPNAME": "pg-test"}
    if password is not None:
        env["PGPASSWORD"] = password
    cmd = [psql_or_skip(), "-X", "-w", "-A", "-t", "-h", host, "-p", str(port), "-U", "tester"]
    result = await anyio.run_process(
        [*cmd, "-d", "corrosion", "-v", "ON_ERROR_STOP=1", *args], check=False, env=env
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


# -- psql -----------------------------------------------------------------------------------------


async def test_psql_reads_writes_and_refusals(tmp_path):
    async with Agent(pg_config(tmp_path, token=TOKEN)) as agent:
        await agent.execute(["INSERT INTO items VALUES (1, 'one', 'ann')"])
        code, out, err = await psql(agent, "-c", "SELECT id, body, owner FROM items")
        assert (code, out.strip()) == (0, "1|one|ann"), err
        code, out, err = await psql(
            agent,
            "-c",
            "INSERT INTO items VALUES (2, 'two', NULL)",
            "-c",
            "SELECT count(*) FROM items",
        )
        assert code == 0, err
        assert out.split() == ["INSERT", "0", "1", "2"]
        assert await rows(agent, "SELECT body FROM items WHERE id = 2") == [("two",)]
        code, out, err = await psql(agent, "-c", "SELECT version()", "-c", "SHOW server_version")
        assert code == 0 and "PostgreSQL" in out and "corrosion" in out, err
        # a refused statement: an error, with its SQLSTATE, and nothing changed
        code, out, err = await psql(
            agent, "-c", "\\set VERBOSITY verbose", "-c", "CREATE TABLE t2 (a)"
        )
        assert code == 1 and "42501" in err and "not allowed" in err, err
        # psql's \d reads PostgreSQL's catalog, which SQLite has not: said so, with a hint
        code, out, err = await psql(agent, "-c", "\\d items")
        assert code == 1 and "catalog is not available" in err and "sqlite_schema" in err, err
        # a transaction block in one query string: both writes, at COMMIT
        code, out, err = await psql(
            agent,
            "-c",
            "BEGIN; INSERT INTO items VALUES (3, 'x', NULL); "
            "UPDATE items SET body = 'three' WHERE id = 3; COMMIT",
        )
        assert code == 0, err
        assert await rows(agent, "SELECT body FROM items WHERE id = 3") == [("three",)]


async def test_psql_password_is_the_token(tmp_path):
    async with Agent(pg_config(tmp_path, token=TOKEN)) as agent:
        code, _out, err = await psql(agent, "-c", "SELECT 1", password="wrong")
        assert code == 2 and 'password authentication failed for user "tester"' in err, err
        code, _out, err = await psql(agent, "-c", "SELECT 1", password=None)
        assert code == 2 and "password" in err, err
        assert agent.pg_servers[0].stats.auth_failures >= 1
        code, out, err = await psql(agent, "-c", "SELECT 1")
        assert (code, out.strip()) == (0, "1"), err


# -- psycopg --------------------------------------------------------------------------------------


async def test_psycopg_parameters_and_types(tmp_path):
    async with Agent(pg_config(tmp_path, token=TOKEN)) as agent:
        await agent.execute(
            ["INSERT INTO items VALUES (1, 'one', 'ann')", "INSERT INTO flags VALUES (1, 1)"]
        )

        def client() -> None:
            with psycopg.connect(dsn(agent, TOKEN), autocommit=True) as conn:
                cur = conn.execute("SELECT id, body FROM items WHERE id = %s", (1,))
                assert cur.fetchall() == [(1, "one")]
                assert [d.type_code for d in cur.description] == [20, 25]  # int8, text
                values = (7, 2.5, "x'y", b"\x00\xff", True, None)
                for binary in (False, True):
                    with conn.cursor(binary=binary) as c:
                        c.execute("SELECT %s, %s, %s, %s, %s, %s", values)
                        # SQLite has no booleans: True is bound as 1
                        assert c.fetchone() == (7, 2.5, "x'y", b"\x00\xff", 1, None)
                        c.execute("SELECT id, on_, x'00ff', 1.5 FROM flags")
                        assert c.fetchone() == (1, True, b"\x00\xff", 1.5)
                cur = conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (2, "two", None))
                assert cur.rowcount == 1
                cur = conn.execute("UPDATE items SET owner = %s", ("bob",))
                assert cur.rowcount == 2
                # a statement prepared on the server and reused (psycopg prepares after 5 runs)
                for i in range(8):
                    got = conn.execute("SELECT %s + id FROM items WHERE id = 1", (i,)).fetchone()
                    assert got == (i + 1,)

        await anyio.to_thread.run_sync(client)
        assert await rows(agent, "SELECT owner FROM items ORDER BY id") == [("bob",), ("bob",)]


async def test_psycopg_transaction_block_commits_as_one(tmp_path):
    async with Agent(pg_config(tmp_path)) as agent:

        def client() -> None:
            with psycopg.connect(dsn(agent)) as conn:  # not autocommit: psycopg sends BEGIN
                conn.execute("INSERT INTO items VALUES (%s, 'a', NULL)", (1,))
                conn.execute("INSERT INTO items VALUES (%s, 'b', NULL)", (2,))
                conn.commit()
                # a block whose last statement is refused at COMMIT: nothing of it applies
                conn.execute("INSERT INTO items VALUES (3, 'c', NULL)")
                conn.execute("INSERT INTO sqlite_master VALUES (1, 2, 3, 4, 5)")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.commit()
                conn.execute("INSERT INTO items VALUES (4, 'd', NULL)")
                conn.rollback()
                # an error inside a block fails the block until ROLLBACK
                with pytest.raises(psycopg.errors.UndefinedTable):
                    conn.execute("SELECT * FROM nosuch")
                with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                    conn.execute("SELECT 1")
                conn.rollback()
                assert conn.execute("SELECT count(*) FROM items").fetchone() == (2,)

        await anyio.to_thread.run_sync(client)
        assert await rows(agent, "SELECT id FROM items ORDER BY id") == [(1,), (2,)]


async def test_cancel_interrupts_a_long_read(tmp_path):
    async with Agent(pg_config(tmp_path, query_timeout=300.0)) as agent:
        server = agent.pg_servers[0]
        conn = await anyio.to_thread.run_sync(lambda: psycopg.connect(dsn(agent), autocommit=True))
        outcome: dict[str, Any] = {}

        def long_read() -> None:
            try:
                conn.execute(LONG_QUERY)
                outcome["result"] = "finished"
            except psycopg.Error as exc:
                outcome["result"] = exc

        thread = threading.Thread(target=long_read)
        thread.start()
        try:
            await wait_for(
                lambda: any(s.reading for s in server.sessions.values()), what="the read to run"
            )
            await anyio.to_thread.run_sync(conn.cancel_safe)
            await wait_for(lambda: "result" in outcome, what="the read to stop")
        finally:
            await anyio.to_thread.run_sync(thread.join)
        exc = outcome["result"]
        assert isinstance(exc, psycopg.errors.QueryCanceled), exc
        assert "user request" in str(exc)
        assert server.stats.cancels == 1
        # the connection goes on
        got = await anyio.to_thread.run_sync(lambda: conn.execute("SELECT 41 + 1").fetchone())
        assert got == (42,)
        await anyio.to_thread.run_sync(conn.close)


# -- asyncpg --------------------------------------------------------------------------------------


async def test_asyncpg_password_and_errors(tmp_path):
    async with Agent(pg_config(tmp_path, token=TOKEN)) as agent:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await pg_connect(agent, "wrong")
        conn = await pg_connect(agent, TOKEN)
        try:
            with pytest.raises(asyncpg.PostgresSyntaxError) as err:
                await conn.fetch("SELEKT 1")
            assert err.value.sqlstate == "42601"
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("SELECT * FROM nosuch")
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as err:
                await conn.execute("DROP TABLE items")
            assert "not allowed" in str(err.value)
            with pytest.raises(asyncpg.PostgresError) as err:  # a simple query: no parameters
                await conn.execute("SELECT $1")
            assert err.value.sqlstate == "42P02"
            await conn.execute("INSERT INTO items VALUES (1, 'a', NULL)")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO items VALUES (1, 'a', NULL)")
            assert await conn.fetchval("SELECT count(*) FROM items") == 1  # still usable
        finally:
            await conn.close()


async def test_asyncpg_prepared_statements_and_binary_types(tmp_path):
    async with Agent(pg_config(tmp_path)) as agent:
        conn = await pg_connect(agent)
        try:
            # parameters take the type of the column they go into or are compared with
            insert = "INSERT INTO items VALUES ($1, $2, $3)"
            await conn.executemany(insert, [(i, f"body {i}", None) for i in range(1, 21)])
            await conn.execute("INSERT INTO flags (on_, id) VALUES ($1, $2)", True, 1)
            stmt = await conn.prepare("SELECT id, body FROM items WHERE id > $1 ORDER BY id")
            assert [r["id"] for r in await stmt.fetch(17)] == [18, 19, 20]
            assert await stmt.fetchval(19) == 20
            assert await conn.fetchval("SELECT id FROM flags WHERE on_ = $1", True) == 1
            # elsewhere, a cast says the type; without one a parameter is text
            assert await conn.fetchval("SELECT $1::int8 * 2", 21) == 42
            assert await conn.fetchval("SELECT $1 || '!'", "hi") == "hi!"
            assert await conn.fetchval("SELECT count(*) FROM items") == 20
            row = await conn.fetchrow("SELECT on_, x'00ff' AS b, 2.5 AS f, NULL AS n FROM flags")
            assert tuple(row) == (True, b"\x00\xff", 2.5, None)
            # rows in batches: a cursor in a transaction block (Execute with a row limit)
            async with conn.transaction():
                cursor = await conn.cursor("SELECT id FROM items ORDER BY id")
                assert [r["id"] for r in await cursor.fetch(7)] == list(range(1, 8))
                assert [r["id"] for r in await cursor.fetch(7)] == list(range(8, 15))
        finally:
            await conn.close()


async def test_asyncpg_pool_reuses_its_connections(tmp_path):
    """A pool resets a connection it gets back (advisory locks, CLOSE ALL, RESET ALL...): the
    reset must not fail, or the pool would drop every connection it lends."""
    async with Agent(pg_config(tmp_path)) as agent:
        host, port = agent.pg_addrs[0]
        pool = await asyncpg.create_pool(
            host=host, port=port, user="tester", database="corrosion", ssl=False, min_size=1,
            max_size=1,
        )  # fmt: skip
        try:
            for i in range(3):
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT $1::int8 + 1", i) == i + 1
                    assert await conn.fetchval("SHOW transaction isolation level")
            assert agent.pg_servers[0].stats.connections == 1  # the same one, each time
        finally:
            await pool.close()


async def test_writes_replicate_to_another_agent(tmp_path):
    api = {"addr": "127.0.0.1:0", "pg": {"addr": "127.0.0.1:0"}}
    async with cluster(tmp_path, 2, api=api) as (a, b):
        writer = await pg_connect(a)
        reader = await pg_connect(b)
        try:
            await writer.execute("INSERT INTO kv (k, v) VALUES ($1, $2)", "replicated", "yes")
            async with writer.transaction():
                await writer.execute("UPDATE kv SET n = n + 1 WHERE k = 'replicated'")
                await writer.execute("UPDATE kv SET n = n + 1 WHERE k = 'replicated'")

            async def replicated() -> bool:
                return await reader.fetch("SELECT v, n FROM kv") == [("yes", 2)]

            await wait_for(replicated, what="the writes on the other agent")
        finally:
            await writer.close()
            await reader.close()


async def test_readonly_listener_refuses_writes(tmp_path):
    config = pg_config(tmp_path)
    readonly = dataclasses.replace(config.api.pg[0], readonly=True)
    config = dataclasses.replace(config, api=dataclasses.replace(config.api, pg=(readonly,)))
    async with Agent(config) as agent:
        await agent.execute(["INSERT INTO items VALUES (1, 'one', NULL)"])
        conn = await pg_connect(agent)
        try:
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("UPDATE items SET body = $1", "changed")
            assert await conn.fetchval("SELECT body FROM items") == "one"
        finally:
            await conn.close()


# -- the protocol itself --------------------------------------------------------------------------


def _exchange(addr: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(addr, timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _startup(user: str = "tester") -> bytes:
    body = struct.pack("!i", 3 << 16) + b"user\0" + user.encode() + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


async def test_garbage_is_dropped_and_counted(tmp_path):
    async with Agent(pg_config(tmp_path)) as agent:
        server = agent.pg_servers[0]
        addr = agent.pg_addrs[0]
        garbage = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a length of 1.2 GB
            struct.pack("!i", 2) + b"\x00" * 16,  # a length shorter than itself
            _startup() + b"\xfe" + struct.pack("!i", 8) + b"abcd",  # an unknown message type
            _startup() + b"Q" + struct.pack("!i", 9) + b"SELECT",  # a string without its end
            _startup() + b"P" + struct.pack("!i", 1 << 30),  # a message too long
        ]
        for i, data in enumerate(garbage):
            reply = await anyio.to_thread.run_sync(_exchange, addr, data)
            assert b"08P01" in reply, (i, reply)
            await wait_for(
                lambda i=i: server.stats.protocol_errors == i + 1, what="the error counted"
            )
        # an SSLRequest is answered N; the client may then start up in plaintext
        ssl_request = struct.pack("!ii", 8, 80877103)
        reply = await anyio.to_thread.run_sync(
            _exchange, addr, ssl_request + _startup() + b"X" + struct.pack("!i", 4)
        )
        assert reply.startswith(b"NR") and b"server_version" in reply
        # a CancelRequest with a key no connection has changes nothing
        await anyio.to_thread.run_sync(_exchange, addr, struct.pack("!iiii", 16, 80877102, 1, 2))
        assert server.stats.cancels == 0
        conn = await pg_connect(agent)
        try:
            assert await conn.fetchval("SELECT 40 + 2") == 42
        finally:
            await conn.close()
        metrics = render(collect(agent))
        assert f"corro_pg_protocol_errors_total {len(garbage)}" in metrics


def test_parameter_types_from_the_columns_they_meet():
    schema = {
        "items": [("id", "INTEGER"), ("body", "TEXT")],
        "flags": [("id", "INTEGER"), ("on_", "BOOLEAN")],
        "kv": [("k", "TEXT"), ("v", "ANY"), ("id", "TEXT")],
    }
    infer = infer_param_types
    assert infer("SELECT * FROM items WHERE id = $1 AND $2 < items.id", {1, 2}, schema) == {
        1: pgp.INT8, 2: pgp.INT8,
    }  # fmt: skip
    assert infer("INSERT INTO flags (on_, id) VALUES ($1, $2)", {1, 2}, schema) == {
        1: pgp.BOOL, 2: pgp.INT8,
    }  # fmt: skip
    assert infer("UPDATE kv SET k = $1 WHERE v = $2", {1, 2}, schema) == {1: pgp.TEXT}
    assert infer("SELECT 1 FROM items WHERE id IN ($1, $2)", {1}, schema) == {1: pgp.INT8}
    # "id" is an integer in items and flags, text in kv: known only when the tables are named
    assert infer("SELECT * FROM items JOIN flags USING (id) WHERE id = $1", {1}, schema) == {
        1: pgp.INT8
    }
    assert infer("SELECT $1 = id", {1}, schema) == {}
    assert infer("SELECT * FROM kv, items WHERE id = $1", {1}, schema) == {}


def test_config_forms():
    base = {"db": {"path": "/tmp/x.db"}}
    one = Config.from_mapping({**base, "api": {"pg": {"addr": "127.0.0.1:5432"}}})
    assert one.api.pg_addrs == (("127.0.0.1", 5432),)
    # corrosion's form: [[api.pg]] tables
    many = Config.from_mapping(
        {**base, "api": {"pg": [{"addr": "127.0.0.1:5432"}, {"addr": "[::1]:5433"}]}}
    )
    assert many.api.pg_addrs == (("127.0.0.1", 5432), ("::1", 5433))
    exposed = Config.from_mapping({**base, "api": {"pg": {"addr": "0.0.0.0:5432"}}})
    assert any("api.pg.addr 0.0.0.0:5432" in w for w in security_warnings(exposed))
    assert security_warnings(one) == []  # loopback
    ro = Config.from_mapping({**base, "api": {"pg": [{"addr": "127.0.0.1:1", "readonly": True}]}})
    assert ro.api.pg[0].readonly and not one.api.pg[0].readonly
    with pytest.raises(ConfigError, match=r"api\.pg\.tls: the PostgreSQL server has no TLS"):
        Config.from_mapping({**base, "api": {"pg": {"addr": "127.0.0.1:1", "tls": {}}}})
    with pytest.raises(ConfigError, match=r"api\.pg\.readonly: expected true or false"):
        Config.from_mapping({**base, "api": {"pg": {"addr": "127.0.0.1:1", "readonly": "yes"}}})
    with pytest.raises(ConfigError, match=r"api\.pg\.addr: is required"):
        Config.from_mapping({**base, "api": {"pg": {}}})
    with pytest.raises(ConfigError, match=r"api\.pg\[1\]\.addr: port must be a number"):
        Config.from_mapping({**base, "api": {"pg": [{"addr": "127.0.0.1:1"}, {"addr": "h:x"}]}})
    with pytest.raises(ConfigError, match=r"api\.pg: expected a table"):
        Config.from_mapping({**base, "api": {"pg": "127.0.0.1:5432"}})
