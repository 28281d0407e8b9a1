"""Incremental subscriptions: after any sequence of local and replicated writes (inserts,
updates that change a primary key or a join key, deletes), a subscription's rows equal a fresh
run of its query, and its events (kinds, row ids, rows, change ids) are exactly those of the
full re-run. Real stores; the subscriptions read the database through the agent's readers.

``SUBS_EXAMPLES=n`` runs n examples instead of the default (for a longer run)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from agent_helpers import agent_config, apply_now, commit_now, rows, seed_addr
from hypothesis import given, settings
from hypothesis import strategies as st
from support import wait_for

from corrosion import Agent
from corrosion.core.ranges import RangeSet
from corrosion.core.store import StatementError, Store
from corrosion.runtime import subscriptions
from corrosion.runtime.reads import Reads
from corrosion.runtime.subscriptions import Subscriptions, _order, describe

EXAMPLES = int(os.environ.get("SUBS_EXAMPLES", "40"))

SCHEMA = """
CREATE TABLE svc (id INTEGER NOT NULL PRIMARY KEY, name TEXT, port INTEGER);
CREATE TABLE mach (id TEXT NOT NULL PRIMARY KEY, svc INTEGER, state TEXT, cpu INTEGER);
CREATE TABLE reg (region TEXT NOT NULL, svc INTEGER NOT NULL, weight INTEGER,
                  PRIMARY KEY (region, svc));
"""

# (query, parameters): re-evaluated by primary key
INCREMENTAL = [
    ("SELECT id, state FROM mach WHERE state = 'started'", ()),
    ("SELECT state, cpu FROM mach WHERE cpu > 1", ()),  # no key: rows told apart by content
    ("SELECT * FROM mach", ()),
    ("SELECT id, cpu * 2 + 1 AS x, coalesce(state, 'none') FROM mach ORDER BY cpu", ()),
    (
        "SELECT m.id, s.name, s.port FROM mach m JOIN svc s ON s.id = m.svc "
        "WHERE m.state = 'started'",
        (),
    ),
    ("SELECT m.state, s.name FROM mach m JOIN svc s ON s.id = m.svc", ()),
    (
        "SELECT m.id, s.id, r.region, r.weight FROM mach m, svc s, reg r "
        "WHERE s.id = m.svc AND r.svc = s.id AND r.weight > 1",
        (),
    ),
    ("SELECT m.id, upper(s.name) FROM mach AS m INNER JOIN svc AS s ON s.id = m.svc", ()),
    (
        "SELECT s.name, r.region FROM svc s JOIN reg r ON r.svc = s.id "
        "WHERE r.weight IS NULL OR r.weight < ?",
        (3,),
    ),
    ("SELECT r.region, s.port FROM reg r CROSS JOIN svc s WHERE s.port = r.weight", ()),
    ("SELECT id, name FROM svc WHERE name LIKE :p", {"p": "s%"}),
]
# the full re-run
FULL = [
    ("SELECT state, count(*) FROM mach GROUP BY state", ()),
    ("SELECT count(*), max(cpu) FROM mach", ()),
    ("SELECT count(*) FROM svc", ()),  # reads no column of svc: still notified
    ("SELECT DISTINCT state FROM mach", ()),
    ("SELECT m.id, s.name FROM mach m LEFT JOIN svc s ON s.id = m.svc", ()),
    ("SELECT id FROM mach WHERE svc IN (SELECT id FROM svc WHERE port > 2)", ()),
    ("SELECT id, cpu FROM mach ORDER BY cpu, id LIMIT 3", ()),
    ("SELECT id FROM mach UNION SELECT name FROM svc", ()),
    ("SELECT id, sum(cpu) OVER (PARTITION BY svc) FROM mach", ()),
    ("SELECT a.id, b.id FROM mach a JOIN mach b ON a.svc = b.svc", ()),
]

MACHINES = st.sampled_from(["m0", "m1", "m2", "m3", "m4"])
SERVICES = st.integers(0, 3)
REGIONS = st.sampled_from(["ams", "iad"])
SMALL = st.none() | st.integers(0, 4)
STATES = st.sampled_from([None, "started", "stopped"])
NAMES = st.sampled_from([None, "s1", "s2", "web", "S1"])

WRITES = st.one_of(
    st.tuples(
        st.just(
            "INSERT INTO mach (id, svc, state, cpu) VALUES (?, ?, ?, ?) ON CONFLICT (id) "
            "DO UPDATE SET svc = excluded.svc, state = excluded.state, cpu = excluded.cpu"
        ),
        st.tuples(MACHINES, st.none() | SERVICES, STATES, SMALL),
    ),
    st.tuples(st.just("UPDATE mach SET svc = ? WHERE id = ?"), st.tuples(SERVICES, MACHINES)),
    st.tuples(st.just("UPDATE mach SET state = ? WHERE id = ?"), st.tuples(STATES, MACHINES)),
    st.tuples(st.just("UPDATE mach SET id = ? WHERE id = ?"), st.tuples(MACHINES, MACHINES)),
    st.tuples(st.just("DELETE FROM mach WHERE id = ?"), st.tuples(MACHINES)),
    st.tuples(
        st.just(
            "INSERT INTO svc (id, name, port) VALUES (?, ?, ?) ON CONFLICT (id) "
            "DO UPDATE SET name = excluded.name, port = excluded.port"
        ),
        st.tuples(SERVICES, NAMES, SMALL),
    ),
    st.tuples(st.just("UPDATE svc SET id = ? WHERE id = ?"), st.tuples(SERVICES, SERVICES)),
    st.tuples(st.just("DELETE FROM svc WHERE id = ?"), st.tuples(SERVICES)),
    st.tuples(
        st.just(
            "INSERT INTO reg (region, svc, weight) VALUES (?, ?, ?) ON CONFLICT (region, svc) "
            "DO UPDATE SET weight = excluded.weight"
        ),
        st.tuples(REGIONS, SERVICES, SMALL),
    ),
    st.tuples(st.just("UPDATE reg SET svc = ? WHERE svc = ?"), st.tuples(SERVICES, SERVICES)),
    st.tuples(st.just("DELETE FROM reg WHERE region = ?"), st.tuples(REGIONS)),
)
# a transaction of 1-3 writes, made here or on the other node; then whether to evaluate now
STEPS = st.lists(
    st.tuples(st.lists(WRITES, min_size=1, max_size=3), st.booleans(), st.booleans()),
    min_size=1,
    max_size=25,
)


class Node:
    """Two real stores: ``here`` (subscribed) and ``there`` (whose versions replicate here);
    here's versions go there too, so its writes meet the rows they touch."""

    def __init__(self, base: Path) -> None:
        self.here = Store(base / "here.db")
        self.there = Store(base / "there.db")
        for store in (self.here, self.there):
            store.apply_schema(SCHEMA)
        self.ts = 0

    def write(self, statements: list[tuple[str, tuple]], remote: bool) -> list[Any]:
        """Commit ``statements`` (here, or there and replicate): the changes committed here."""
        self.ts += 1
        origin, other = (self.there, self.here) if remote else (self.here, self.there)
        try:
            _, commit = commit_now(origin, statements, self.ts)
        except StatementError:
            return []  # a primary key taken: nothing applied
        if commit is None:
            return []
        chunks = list(origin.serve(origin.actor_id, RangeSet([(commit.version, commit.version)])))
        applied = apply_now(other, chunks)
        return applied.changes if remote else commit.changes

    def close(self) -> None:
        self.here.close()
        self.there.close()


def fresh(reads: Reads, sql: str, params: Any) -> list[tuple]:
    conn = reads.connection()
    try:
        return sorted(conn.execute(sql, params).fetchall(), key=_order)
    finally:
        reads.release(conn)


async def check(base: Path, queries: list[tuple[str, Any]], steps: list, incremental: bool) -> None:
    node = Node(base)
    reads = Reads(base / "here.db")
    subs = Subscriptions(reads.connection, reads.release)
    full = Subscriptions(reads.connection, reads.release, incremental=False)
    try:
        pairs = []
        for sql, params in queries:
            sub, _ = await subs.get_or_create(sql, params)
            assert (sub.plan is not None) == incremental, (sql, sub.plan)
            pairs.append(((await full.get_or_create(sql, params))[0], sub))
        events: dict[int, list] = {id(s): [] for pair in pairs for s in pair}
        catch = {
            id(s): m.listen(s)[0] for pair in pairs for m, s in zip((full, subs), pair, strict=True)
        }
        for statements, remote, evaluate in [*steps, ([], False, True)]:
            changes = node.write(statements, remote) if statements else []
            subs.notify(changes)
            full.notify(changes)
            if not evaluate:
                continue
            for (by_rerun, by_key), (sql, params) in zip(pairs, queries, strict=True):
                await full.evaluate(by_rerun)
                await subs.evaluate(by_key)
                for s in (by_rerun, by_key):
                    while True:
                        try:
                            events[id(s)].append(catch[id(s)].receive_nowait().to_json())
                        except anyio.WouldBlock:
                            break
                assert events[id(by_key)] == events[id(by_rerun)], sql
                want = fresh(reads, sql, params)
                assert sorted(by_key.rows.values(), key=_order) == want, sql
                assert sorted(by_rerun.rows.values(), key=_order) == want, sql
    finally:
        node.close()
        reads.close()


@settings(max_examples=EXAMPLES)
@given(steps=STEPS)
def test_incremental_rows_and_events_equal_the_full_rerun(tmp_path_factory, steps):
    base = tmp_path_factory.mktemp("incr")
    anyio.run(check, base, INCREMENTAL, steps, True)


@settings(max_examples=max(EXAMPLES // 2, 1))
@given(steps=STEPS)
def test_full_rerun_shapes_stay_right(tmp_path_factory, steps):
    base = tmp_path_factory.mktemp("full")
    anyio.run(check, base, FULL, steps, False)


def test_which_shapes_are_incremental(tmp_path):
    """SQLite decides what it can (subqueries, views, aggregates, functions); a shape that
    needs the full re-run says why."""
    store = Store(tmp_path / "db.db")
    store.apply_schema(SCHEMA)
    store.conn.execute("CREATE VIEW started AS SELECT * FROM mach")  # a local view
    store.close()
    reads = Reads(tmp_path / "db.db")
    conn = reads.connection()
    try:
        for sql, params in INCREMENTAL:
            assert describe(conn, sql, params).plan is not None, sql
        reasons = {
            "SELECT * FROM started": "a subquery, view or compound select",
            "SELECT count(*) FROM mach": "an aggregate",
            "SELECT id, random() FROM mach": "random() is not deterministic",
            "SELECT id FROM mach WHERE datetime(cpu) > 0": "datetime() can depend on the clock",
            "SELECT * FROM mach LIMIT 1": "LIMIT",
            "SELECT * FROM mach, json_each('[1]')": "a table-valued function",
            "SELECT * FROM mach m LEFT JOIN svc s ON s.id = m.svc": "an outer join",
        }
        for sql, why in reasons.items():
            described = describe(conn, sql, ())
            assert described.plan is None and described.full_rerun == why, sql
        for sql, _ in FULL:
            assert describe(conn, sql, ()).plan is None, sql
        # a trailing comment, and the columns keep their names as written
        spelled = describe(conn, "SELECT id, cpu+1 FROM mach -- the end", ())
        assert spelled.plan is not None and spelled.columns == ["id", "cpu+1"]
    finally:
        reads.release(conn)
        reads.close()


@pytest.mark.anyio
async def test_a_join_subscription_follows_local_and_replicated_writes(tmp_path):
    """Through the HTTP API: machines joined with their services, incremental, on two agents."""
    schema = tmp_path / "schema" / "schema.sql"
    sections: Any = {"db": {"schema_paths": [str(schema)]}}
    cfg_a = agent_config(tmp_path, "a", **sections)
    schema.write_text(SCHEMA)
    async with Agent(cfg_a) as a:
        cfg_b = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, **sections)
        schema.write_text(SCHEMA)
        async with Agent(cfg_b) as b:
            await wait_for(lambda: a.alive_members() == 1, what="the agents to meet")
            await a.execute(
                [
                    "INSERT INTO svc (id, name, port) VALUES (1, 'web', 80), (2, 'db', 5432)",
                    "INSERT INTO mach (id, svc, state) VALUES ('m1', 1, 'started')",
                ]
            )
            host, port = a.api_addrs[0]
            sql = (
                "SELECT m.id, s.id AS sid, s.name, s.port FROM mach m JOIN svc s "
                "ON s.id = m.svc WHERE m.state = 'started'"
            )
            async with (
                httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as c,
                c.stream("POST", "/v1/subscriptions", json=sql) as resp,
            ):
                lines = resp.aiter_lines()

                async def next_json() -> Any:
                    with anyio.fail_after(30):
                        return json.loads(await lines.__anext__())["change"]

                assert json.loads(await lines.__anext__()) == {
                    "columns": ["id", "sid", "name", "port"]
                }
                assert json.loads(await lines.__anext__()) == {"row": [1, ["m1", 1, "web", 80]]}
                assert "eoq" in json.loads(await lines.__anext__())
                assert a.subscriptions.by_id[resp.headers["corro-query-id"]].plan is not None
                # the join key: another row of the join (rows are told apart by both keys)
                await a.execute(["UPDATE mach SET svc = 2 WHERE id = 'm1'"])
                assert await next_json() == ["delete", 1, ["m1", 1, "web", 80], 1]
                assert await next_json() == ["insert", 2, ["m1", 2, "db", 5432], 2]

                async def replicated() -> bool:
                    return await rows(b, "SELECT svc FROM mach WHERE id = 'm1'") == [(2,)]

                await wait_for(replicated, what="m1 to replicate")
                await b.execute(["INSERT INTO mach (id, svc, state) VALUES ('m2', 1, 'started')"])
                assert await next_json() == ["insert", 3, ["m2", 1, "web", 80], 3]
                await b.execute(["UPDATE svc SET port = 8080 WHERE id = 1"])  # the other table
                assert await next_json() == ["update", 3, ["m2", 1, "web", 8080], 4]
                await a.execute(["UPDATE mach SET id = 'm3' WHERE id = 'm1'"])  # a primary key
                assert await next_json() == ["delete", 2, ["m1", 2, "db", 5432], 5]
                assert await next_json() == ["insert", 4, ["m3", 2, "db", 5432], 6]
                await a.execute(["UPDATE mach SET state = 'stopped' WHERE id = 'm2'"])
                assert await next_json() == ["delete", 3, ["m2", 1, "web", 8080], 7]


@pytest.mark.anyio
async def test_select_star_after_a_column_is_added_drops_the_subscription(tmp_path, caplog):
    """The agent running: ``SELECT *`` gains a column with ``corrosion reload``; its rows no
    longer fit the subscription (nor its hidden keys), so it is dropped with one warning and
    its stream ends; a client subscribes again and gets the new columns."""
    cfg = agent_config(tmp_path, "a")
    caplog.set_level(logging.WARNING, logger="corrosion.subscriptions")
    async with Agent(cfg) as a:
        await a.execute(["INSERT INTO items (id, body) VALUES (1, 'x')"])
        host, port = a.api_addrs[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as c:
            async with c.stream("POST", "/v1/subscriptions", json="SELECT * FROM items") as resp:
                sid = resp.headers["corro-query-id"]
                assert a.subscriptions.by_id[sid].plan is not None
                lines = resp.aiter_lines()
                for _ in range(3):  # columns, the row, eoq
                    await lines.__anext__()
                schema = tmp_path / "schema" / "schema.sql"
                schema.write_text(schema.read_text().replace("owner TEXT", "owner TEXT, x TEXT"))
                await a.reload_schema()
                await a.execute(["UPDATE items SET body = 'y' WHERE id = 1"])
                with anyio.fail_after(30):
                    rest = [line async for line in lines]
                # the stream ended with an error line, no change in the old shape
                assert [list(json.loads(line)) for line in rest] == [["error"]]
            assert sid not in a.subscriptions.by_id
            [line] = [r.getMessage() for r in caplog.records if r.name == "corrosion.subscriptions"]
            assert sid in line and "+1 column(s)" in line
            async with c.stream("POST", "/v1/subscriptions", json="SELECT * FROM items") as resp:
                first = json.loads(await resp.aiter_lines().__anext__())
                assert first == {"columns": ["id", "body", "owner", "x"]}


def test_a_burst_of_changes_runs_the_query_whole_then_goes_on_incrementally(tmp_path, monkeypatch):
    """More changed rows than the slice limit: the whole query runs (the same events); the
    next small change is incremental again."""
    monkeypatch.setattr(subscriptions, "SLICE_LIMIT", 2)

    async def main() -> None:
        node = Node(tmp_path)
        reads = Reads(tmp_path / "here.db")
        subs = Subscriptions(reads.connection, reads.release)
        try:
            sub, _ = await subs.get_or_create("SELECT id, cpu FROM mach", ())
            insert = "INSERT INTO mach (id, cpu) VALUES (?, ?)"
            burst = node.write([(insert, (f"m{i}", i)) for i in range(3)], remote=False)
            subs.notify(burst)
            assert sub.dirty and not sub.pending
            await subs.evaluate(sub)
            assert sorted(sub.rows.items()) == [(1, ("m0", 0)), (2, ("m1", 1)), (3, ("m2", 2))]
            one = node.write([("UPDATE mach SET cpu = 9 WHERE id = 'm1'", ())], remote=True)
            subs.notify(one)
            assert not sub.dirty and sub.pending
            await subs.evaluate(sub)
            assert sub.rows[2] == ("m1", 9) and sub.change_id == 4
            assert sorted(sub.rows.values()) == fresh(reads, "SELECT id, cpu FROM mach", ())
        finally:
            node.close()
            reads.close()

    anyio.run(main)
