"""Durable subscriptions: each in its own SQLite file, restored at start-up (after a clean stop
or a SIGKILL) and brought up to date, so ``GET /v1/subscriptions/{id}?from=N`` resumes with the
same id, change ids and row ids; corrosion's ``skip_rows``, purged ids and ``from`` rules; a
file that cannot be used is dropped with a warning and start-up goes on."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any

import anyio
import httpx
import pytest
from agent_helpers import agent_config, cluster, commit_now, rows, seed_addr
from support import wait_for
from test_agent_crash import AgentProcess

from corrosion import Agent
from corrosion.config import ConfigError
from corrosion.core.store import Store

pytestmark = pytest.mark.anyio

KV = "SELECT k, v FROM kv"


def api(agent: Agent) -> str:
    host, port = agent.api_addrs[0]
    return f"http://{host}:{port}"


class Follower:
    """A subscriber as a client application keeps one: the rows by row id, the last change id;
    every change must be the next id (none missed, none repeated)."""

    def __init__(self) -> None:
        self.sid = ""
        self.view: dict[int, list] = {}
        self.last = -1  # the last change id seen (-1: not even the end of the snapshot)
        self.changes: list[list] = []
        self.ended = 0  # streams that ended (the agent went away)

    async def follow(
        self, client: httpx.AsyncClient, method: str, url: str, statement: Any = None
    ) -> None:
        """Read the stream until the agent goes away."""
        try:
            async with client.stream(method, url, json=statement) as resp:
                assert resp.status_code == 200, await resp.aread()
                self.sid = resp.headers["corro-query-id"]
                async for line in resp.aiter_lines():
                    self.take(json.loads(line))
        except httpx.TransportError:
            self.ended += 1  # the agent stopped or was killed

    def take(self, msg: dict) -> None:
        if "columns" in msg:
            self.view.clear()  # a fresh snapshot follows
        elif "row" in msg:
            rowid, row = msg["row"]
            self.view[rowid] = row
        elif "eoq" in msg:
            self.last = msg["eoq"]["change_id"]
        elif "change" in msg:
            kind, rowid, row, change_id = msg["change"]
            assert change_id == self.last + 1, (change_id, self.last)
            self.last = change_id
            self.changes.append(msg["change"])
            if kind == "delete":
                assert self.view.pop(rowid) == row
            else:
                assert kind == "update" or rowid not in self.view
                self.view[rowid] = row
        else:
            raise AssertionError(msg)


async def snapshot(client: httpx.AsyncClient, url: str, **kw: Any) -> tuple[str, dict, int]:
    """Subscribe, read the rows up to ``eoq``, leave: (id, rows by row id, change id)."""
    async with client.stream("POST", url, **kw) as resp:
        assert resp.status_code == 200
        got = Follower()
        lines = resp.aiter_lines()
        assert "columns" in json.loads(await lines.__anext__())
        while got.last < 0:
            got.take(json.loads(await lines.__anext__()))
        return resp.headers["corro-query-id"], got.view, got.last


async def nothing() -> None:
    pass


async def first_lines(
    client: httpx.AsyncClient, method: str, url: str, n: int, write, statement: Any = None
) -> list:
    """The first ``n`` lines of a stream, ``write()`` being awaited once it is open."""
    async with client.stream(method, url, json=statement) as resp:
        assert resp.status_code == 200, await resp.aread()
        lines = resp.aiter_lines()
        await write()
        with anyio.fail_after(60):
            return [json.loads(await lines.__anext__()) for _ in range(n)]


async def test_changes_made_while_the_agent_was_down_are_the_next_changes(tmp_path):
    """A clean stop; the database changes while the agent is down (a local transaction on the
    file, as one committed just before a crash would be); at start-up the subscription becomes
    those changes, with the next ids, and keeps its row ids. Values keep their types exactly
    (no spurious update for 1 vs 1.0 or a blob)."""
    cfg = agent_config(tmp_path, "a")
    values = [("a", 1), ("b", 1.0), ("c", b"\x00\xff"), ("d", None), ("e", "x")]
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        await a.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", list(kv)] for kv in values])
        sid, before, change_id = await snapshot(c, "/v1/subscriptions", json=KV)
        assert change_id == 0 and sorted(before.values()) == [
            ["a", 1],
            ["b", 1.0],
            ["c", [0, 255]],
            ["d", None],
            ["e", "x"],
        ]
        rowid = {row[0]: r for r, row in before.items()}
        await a.execute(["UPDATE kv SET v = 2 WHERE k = 'a'"])
        await wait_for(lambda: a.subscriptions.by_id[sid].change_id == 1, what="change 1")
    subs_dir = cfg.db.subscriptions_dir()
    assert (subs_dir / sid.replace("-", "") / "sub.sqlite").is_file()

    store = Store(cfg.db.path)  # the agent is down: change its database directly
    try:
        down = [
            "UPDATE kv SET v = 3 WHERE k = 'a'",
            "DELETE FROM kv WHERE k = 'e'",
            "INSERT INTO kv (k, v) VALUES ('f', 6)",
        ]
        commit_now(store, [(sql, ()) for sql in down], int(time.time() * 1000))
    finally:
        store.close()

    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        assert a.subscriptions.by_id[sid].change_id == 4  # caught up before the API opened

        async def insert_g() -> None:
            await a.execute(["INSERT INTO kv (k, v) VALUES ('g', 7)"])

        got = await first_lines(c, "GET", f"/v1/subscriptions/{sid}?from=1", 4, insert_g)
        changes = [m["change"] for m in got]
        assert [ch[3] for ch in changes] == [2, 3, 4, 5]
        kinds = {ch[0]: ch for ch in changes[:3]}
        assert kinds["update"][1:3] == [rowid["a"], ["a", 3]]
        assert kinds["delete"][1:3] == [rowid["e"], ["e", "x"]]
        assert kinds["insert"][2] == ["f", 6] and kinds["insert"][1] not in before
        assert changes[3][:3] == ["insert", kinds["insert"][1] + 1, ["g", 7]]
        # the same SQL, spelled otherwise, is the same subscription, with the same row ids
        same, now, last = await snapshot(c, "/v1/subscriptions", json="SELECT k,v\nFROM kv;")
        assert (same, last) == (sid, 5)
        assert {r: row for r, row in now.items() if row[0] in "bcd"} == {
            r: row for r, row in before.items() if row[0] in "bcd"
        }
        assert now[rowid["a"]] == ["a", 3]


async def test_a_clean_restart_resumes_with_what_another_node_wrote_meanwhile(tmp_path):
    async with Agent(agent_config(tmp_path, "b", with_api=False)) as b:
        cfg = agent_config(tmp_path, "a", [seed_addr(b)])
        sub = Follower()
        await b.execute(["INSERT INTO kv (k, v) VALUES ('a', 1), ('b', 2)"])
        async with Agent(cfg) as a, httpx.AsyncClient(timeout=30) as c:
            await wait_for(lambda: a.alive_members() == 1, what="the agents to meet")
            await wait_for(lambda: rows(a, KV), what="a to have b's rows")
            async with anyio.create_task_group() as tg:
                tg.start_soon(sub.follow, c, "POST", f"{api(a)}/v1/subscriptions", KV)
                await wait_for(lambda: sub.last == 0, what="the snapshot")
                await b.execute(["UPDATE kv SET v = 10 WHERE k = 'a'"])
                await wait_for(lambda: sub.last == 1, what="b's update")
                await a.execute(["INSERT INTO kv (k, v) VALUES ('c', 3)"])
                await wait_for(lambda: sub.last == 2, what="a's insert")
                tg.cancel_scope.cancel()
        seen = dict(sub.view)
        # a is down: b goes on
        await b.execute(["UPDATE kv SET v = 20 WHERE k = 'b'", "DELETE FROM kv WHERE k = 'c'"])
        await b.execute(["INSERT INTO kv (k, v) VALUES ('d', 4)"])
        expected = sorted([list(r) for r in await rows(b, KV)])
        async with Agent(cfg) as a, httpx.AsyncClient(timeout=30) as c:
            url = f"{api(a)}/v1/subscriptions/{sub.sid}?from={sub.last}"
            async with anyio.create_task_group() as tg:
                tg.start_soon(sub.follow, c, "GET", url)
                await wait_for(
                    lambda: sorted(sub.view.values()) == expected, what="b's writes, resumed"
                )
                tg.cancel_scope.cancel()
            assert [ch[3] for ch in sub.changes] == [1, 2, 3, 4, 5]
            rowid = {row[0]: r for r, row in seen.items()}
            assert sub.view[rowid["b"]] == ["b", 20]  # the same row id, updated
            assert rowid["c"] not in sub.view
            sid, fresh, last = await snapshot(c, f"{api(a)}/v1/subscriptions", json=KV)
            assert (sid, fresh, last) == (sub.sid, sub.view, 5)


async def test_a_killed_agent_resumes_its_subscription_with_no_change_missed(tmp_path):
    """SIGKILL while changes stream in: the client resumes from the last change it saw; the
    changes it had not seen, those made while the agent was down and after, arrive once each,
    in order, and its rows end equal to the query's, with the row ids it knew."""
    async with cluster(tmp_path, 1, with_api=False) as (a,):
        proc = AgentProcess(tmp_path, [seed_addr(a)])
        sql = "SELECT id, body FROM items"
        try:
            await proc.start()
            await wait_for(lambda: a.alive_members() == 1, what="the process agent to join")
            sub = Follower()
            stop = anyio.Event()
            written = [0]

            async def writer() -> None:
                i = 0
                while not stop.is_set():
                    statements = [["INSERT INTO items (id, body) VALUES (?, ?)", [i, f"v{i}"]]]
                    if i % 3 == 2:
                        statements.append(["UPDATE items SET body = 'u' WHERE id = ?", [i - 2]])
                    if i % 5 == 4:
                        statements.append(["DELETE FROM items WHERE id = ?", [i - 1]])
                    await a.execute(statements)
                    written[0] = i = i + 1
                    await anyio.sleep(0.005)

            async def more_writes(n: int, what: str) -> None:
                target = written[0] + n
                await wait_for(lambda: written[0] >= target, what=what)

            async with httpx.AsyncClient(timeout=30) as c, anyio.create_task_group() as tg:
                url = f"http://{proc.api}/v1/subscriptions"
                tg.start_soon(sub.follow, c, "POST", url, sql)
                await wait_for(lambda: sub.last == 0, what="the snapshot")
                tg.start_soon(writer)
                await wait_for(lambda: sub.last >= 20, what="changes to stream")
                proc.kill()  # mid-stream
                await wait_for(lambda: sub.ended == 1, what="the stream to break")
                await more_writes(20, "writes while the agent is down")
                seen = dict(sub.view)
                await proc.start()
                url = f"http://{proc.api}/v1/subscriptions/{sub.sid}?from={sub.last}"
                tg.start_soon(sub.follow, c, "GET", url)
                await more_writes(20, "writes after the restart")
                stop.set()  # the writer may still finish the write it is in: compare live

                async def matches() -> bool:
                    return sorted(sub.view.values()) == sorted(
                        [list(r) for r in await rows(a, sql)]
                    )

                await wait_for(
                    matches, timeout=90, what="the resumed subscription to match the query"
                )
                tg.cancel_scope.cancel()
                # the rows the client knew and that are still there kept their row ids
                for rowid, row in seen.items():
                    if rowid in sub.view:
                        assert sub.view[rowid][0] == row[0]
                sid, fresh, last = await snapshot(
                    c, f"http://{proc.api}/v1/subscriptions", json=sql
                )
                assert (sid, fresh, last) == (sub.sid, sub.view, sub.last)
        finally:
            proc.stop()


async def test_skip_rows_sends_only_changes(tmp_path):
    async with Agent(agent_config(tmp_path, "a")) as a:
        await a.execute(["INSERT INTO kv (k, v) VALUES ('a', 1)"])
        async with httpx.AsyncClient(base_url=api(a), timeout=30) as c:
            n = [1]

            async def update() -> None:
                n[0] += 1
                await a.execute([["UPDATE kv SET v = ? WHERE k = 'a'", [n[0]]]])

            url = "/v1/subscriptions?skip_rows=true"
            first = await first_lines(c, "POST", url, 1, update, KV)
            [sid] = a.subscriptions.by_id
            assert first == [{"change": ["update", 1, ["a", 2], 1]}]  # no columns, rows, eoq
            for query, change_id in (("skip_rows=true", 2), ("from=2&skip_rows=true", 3)):
                got = await first_lines(c, "GET", f"/v1/subscriptions/{sid}?{query}", 1, update)
                assert got == [{"change": ["update", 1, ["a", n[0]], change_id]}]

            got = await first_lines(c, "GET", f"/v1/subscriptions/{sid}?from=0", 3, nothing)
            assert got[:2] == [{"columns": ["k", "v"]}, {"row": [1, ["a", 4]]}]
            assert got[2]["eoq"]["change_id"] == 3  # from=0: a fresh snapshot
            resp = await c.get(f"/v1/subscriptions/{sid}?skip_rows=maybe")
            assert resp.status_code == 400 and "skip_rows" in resp.json()["error"]


async def test_a_purged_change_id_is_refused_and_says_so(tmp_path):
    cfg = agent_config(tmp_path, "a", db={"subscriptions_keep_changes": 3})
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        await a.execute(["INSERT INTO kv (k, v) VALUES ('a', 0)"])
        sid, _rows, _last = await snapshot(c, "/v1/subscriptions", json=KV)
        for i in range(1, 7):
            await a.execute([["UPDATE kv SET v = ? WHERE k = 'a'", [i]]])
            await wait_for(lambda i=i: a.subscriptions.by_id[sid].change_id == i, what=str(i))
        # from=N on a query nobody subscribed to: nothing to resume, and nothing created
        resp = await c.post("/v1/subscriptions?from=5", json="SELECT k FROM kv")
        assert resp.status_code == 400 and "no existing subscription" in resp.json()["error"]
        assert list(a.subscriptions.by_id) == [sid]
        subs_dir = tmp_path / "a" / "state.db.subscriptions"
        assert len(list(subs_dir.iterdir())) == 2  # its dir, agent.lock
        resp = await c.get(f"/v1/subscriptions/{sid}?from=7")
        assert resp.status_code == 400 and "has not happened" in resp.json()["error"]
        resp = await c.get(f"/v1/subscriptions/{sid}?from=2")
        assert resp.status_code == 400 and "purged" in resp.json()["error"]
        got = await first_lines(c, "GET", f"/v1/subscriptions/{sid}?from=3", 3, nothing)
        assert [m["change"][3] for m in got] == [4, 5, 6]
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        resp = await c.get(f"/v1/subscriptions/{sid}?from=2")  # purged before the restart
        error = resp.json()["error"]
        assert resp.status_code == 400 and "purged" in error, error
        assert "db.subscriptions_keep_changes" in error and "oldest kept is 4" in error
        got = await first_lines(c, "GET", f"/v1/subscriptions/{sid}?from=3", 3, nothing)
        assert [m["change"] for m in got] == [["update", 1, ["a", i], i] for i in (4, 5, 6)]


async def test_an_unusable_subscription_file_is_dropped_with_one_warning(tmp_path, caplog):
    cfg = agent_config(tmp_path, "a")
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        sid, _rows, _last = await snapshot(c, "/v1/subscriptions", json=KV)
    subs = tmp_path / "a" / "state.db.subscriptions"
    garbage = subs / ("0" * 32)
    garbage.mkdir()
    (garbage / "sub.sqlite").write_bytes(b"this is not a database\n" * 200)
    foreign = subs / ("1" * 32)  # a file of another format (corrosion's own layout)
    foreign.mkdir()
    with sqlite3.connect(foreign / "sub.sqlite") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID")
        db.execute("INSERT INTO meta VALUES ('sql', 'SELECT 1'), ('state', 'completed')")
    db.close()
    half = subs / ("2" * 32)  # created, then the agent died before its file was written
    half.mkdir()
    newer = subs / sid.replace("-", "")  # ours, but from a future version
    newer_copy = subs / ("3" * 32)
    newer_copy.mkdir()
    (newer_copy / "sub.sqlite").write_bytes((newer / "sub.sqlite").read_bytes())
    with sqlite3.connect(newer_copy / "sub.sqlite") as db:
        db.execute("UPDATE meta SET value = 'corrosion-py subscription 99' WHERE key = 'format'")
    db.close()

    caplog.set_level(logging.INFO, logger="corrosion.subscriptions")
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        assert list(a.subscriptions.by_id) == [sid]
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "corrosion.subscriptions" and r.levelno == logging.WARNING
        ]
        assert len(warnings) == 4, warnings
        for directory, why in (
            (garbage, "cannot open it"),
            (foreign, "its format is none"),
            (half, "no sub.sqlite"),
            (newer_copy, "its format is corrosion-py subscription 99"),
        ):
            [line] = [w for w in warnings if str(directory) in w]
            assert why in line and "\n" not in line, line
            assert not directory.exists()
        assert sorted(p.name for p in subs.iterdir()) == sorted(["agent.lock", newer.name])
        got = await first_lines(c, "GET", f"/v1/subscriptions/{sid}?from=0", 2, nothing)
        assert got == [{"columns": ["k", "v"]}, {"eoq": got[1]["eoq"]}]


async def test_a_live_stream_dropped_by_a_schema_change_is_told_why(tmp_path):
    """A ``SELECT *`` stream open while a column is added: the subscription is dropped and the
    stream's last line says so and what to do (it said "subscriber fell too far behind", which
    sent the client looking for a slow reader)."""
    cfg = agent_config(tmp_path, "a")
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        async with c.stream("POST", "/v1/subscriptions", json="SELECT * FROM items") as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            while "eoq" not in json.loads(await lines.__anext__()):
                pass
            schema = tmp_path / "schema" / "schema.sql"
            schema.write_text(schema.read_text().replace("owner TEXT", "owner TEXT, extra TEXT"))
            await a.reload_schema()
            await a.execute(["INSERT INTO items (id, body) VALUES (1, 'after')"])
            with anyio.fail_after(60):
                last = [json.loads(line) async for line in lines][-1]
        assert "subscription dropped" in last["error"], last
        assert "column" in last["error"] and "subscribe again" in last["error"], last


async def test_two_agents_cannot_share_a_subscriptions_directory(tmp_path):
    shared = {"subscriptions_path": str(tmp_path / "subs")}
    async with Agent(agent_config(tmp_path, "a", db=shared)):
        with pytest.raises(ConfigError, match=r"db\.subscriptions_path: .* is in use"):
            async with Agent(agent_config(tmp_path, "b", db=shared)):
                pass


async def test_a_subscription_whose_columns_changed_with_the_schema_is_dropped(tmp_path, caplog):
    """``SELECT *`` after a column was added: its kept rows have another shape than its query's,
    so it is dropped (one warning; its clients get 404 and subscribe again); the others stay."""
    cfg = agent_config(tmp_path, "a")
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        star, _rows, _last = await snapshot(c, "/v1/subscriptions", json="SELECT * FROM items")
        kept, _rows, _last = await snapshot(c, "/v1/subscriptions", json=KV)
    schema = tmp_path / "schema" / "schema.sql"
    schema.write_text(schema.read_text().replace("owner TEXT", "owner TEXT, extra TEXT"))
    caplog.set_level(logging.WARNING, logger="corrosion.subscriptions")
    async with Agent(cfg) as a, httpx.AsyncClient(base_url=api(a), timeout=30) as c:
        assert list(a.subscriptions.by_id) == [kept]
        [line] = [r.getMessage() for r in caplog.records if r.name == "corrosion.subscriptions"]
        assert star.replace("-", "") in line and "columns changed" in line and "extra" in line
        assert (await c.get(f"/v1/subscriptions/{star}?from=0")).status_code == 404
