"""``corrosion.AsyncClient`` and ``corrosion.Client`` against real agents: the API's calls,
typed errors, and a subscription that follows its agent through restarts with no change missed
or delivered twice."""

from __future__ import annotations

import anyio
import pytest
from agent_helpers import agent_config, rows, seed_addr
from support import free_port, wait_for

from corrosion import (
    Agent,
    AgentUnreachable,
    AsyncClient,
    Client,
    Rejected,
    SubscriptionLost,
    Unauthorized,
)
from corrosion.surfaces.client import Change, Columns, EndOfQuery, Row

pytestmark = pytest.mark.anyio

KV = "SELECT k, v FROM kv ORDER BY k"


def fixed_api(tmp_path, name, seeds=None, **sections):
    """A config whose API port stays the same across restarts (a client keeps its address)."""
    return agent_config(tmp_path, name, seeds, api={"addr": f"127.0.0.1:{free_port()}"}, **sections)


def addr(agent: Agent) -> str:
    return "{}:{}".format(*agent.api_addrs[0])


async def test_calls_and_their_typed_errors(tmp_path):
    cfg = agent_config(tmp_path, "a", api={"authz": {"bearer-token": "s3cret"}})
    async with Agent(cfg) as a:
        async with AsyncClient(addr(a), token="s3cret") as client:
            result = await client.execute(["INSERT INTO kv (k, v) VALUES ('x', 1), ('y', x'00ff')"])
            assert result["results"][0]["rows_affected"] == 2 and result["version"] == 1
            assert [r async for r in client.query(KV)] == [["x", 1], ["y", [0, 255]]]
            events = [e async for e in client.events("SELECT k FROM kv WHERE k = ?", ["x"])]
            assert isinstance(events[0], Columns) and events[0].names == ["k"]
            assert isinstance(events[1], Row) and events[1].values == ["x"]
            assert isinstance(events[2], EndOfQuery)
            status, health = await client.health()
            assert status == 200 and health["gaps"] == 0
            with pytest.raises(Rejected, match="no such column: nope") as err:
                await client.execute(["UPDATE kv SET nope = 1"])
            assert err.value.status == 500  # corrosion's status for a failed transaction
            with pytest.raises(Rejected, match="no such table"):
                [r async for r in client.query("SELECT * FROM missing")]
        async with AsyncClient(addr(a), token="wrong") as client:
            with pytest.raises(Unauthorized, match="refused the bearer token"):
                await client.execute(["SELECT 1"])

        def blocking() -> None:  # the synchronous client, in a thread: the agent runs here
            with Client(addr(a), token="s3cret") as sync:
                assert list(sync.query(KV)) == [["x", 1], ["y", [0, 255]]]
            with Client(addr(a)) as anonymous, pytest.raises(Unauthorized):
                anonymous.execute(["SELECT 1"])

        await anyio.to_thread.run_sync(blocking)
    async with AsyncClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(AgentUnreachable, match="is the agent running"):
            await client.execute(["SELECT 1"])


async def test_updates_name_each_changed_row(tmp_path):
    async with Agent(agent_config(tmp_path, "a")) as a, AsyncClient(addr(a)) as client:
        seen: list[tuple[str, list]] = []

        async def watch() -> None:
            async for kind, pk in client.updates("kv"):
                seen.append((kind, pk))

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await wait_for(lambda: len(a.updates) == 1, what="the watch")
            await client.execute(["INSERT INTO kv (k, v) VALUES ('x', 1)"])
            await client.execute(["DELETE FROM kv WHERE k = 'x'"])
            await wait_for(lambda: len(seen) == 2, what="two updates")
            tg.cancel_scope.cancel()
        assert seen == [("update", ["x"]), ("delete", ["x"])]


async def test_a_subscription_follows_its_agent_through_restarts(tmp_path):
    """Node a serves the subscription and is restarted twice; node b writes all along (also
    while a is down). The client sees every change once, in order, and ends with b's rows."""
    async with Agent(agent_config(tmp_path, "b", with_api=False)) as b:
        cfg = fixed_api(tmp_path, "a", [seed_addr(b)])
        view: dict[int, list] = {}
        change_ids: list[int] = []
        done = anyio.Event()
        subs = []

        async def follow(client: AsyncClient) -> None:
            async with client.subscribe(KV, max_backoff=0.5) as sub:
                subs.append(sub)
                async for event in sub:
                    if isinstance(event, Row):
                        view[event.rowid] = event.values
                    elif isinstance(event, Change):
                        change_ids.append(event.change_id)
                        if event.kind == "delete":
                            view.pop(event.rowid, None)
                        else:
                            view[event.rowid] = event.values
                    if done.is_set():
                        return

        async def b_rows() -> list[list]:
            return sorted(list(r) for r in await rows(b, KV))

        async def converged() -> bool:
            return sorted(view.values()) == await b_rows()

        await b.execute(["INSERT INTO kv (k, v) VALUES ('a', 1)"])
        api = f"127.0.0.1:{cfg.api.addrs[0][1]}"
        async with AsyncClient(api) as client, anyio.create_task_group() as tg:
            async with Agent(cfg) as a:
                await wait_for(lambda: rows(a, KV), what="a to have b's row")
                tg.start_soon(follow, client)
                await wait_for(converged, what="the snapshot")
                await b.execute(["INSERT INTO kv (k, v) VALUES ('b', 2)"])
                await wait_for(converged, what="b's insert through a")
            for n in range(2):  # a is down: b writes; a comes back and catches up
                await b.execute([f"UPDATE kv SET v = v + 10 WHERE k = 'a' -- {n}"])
                await b.execute([f"INSERT INTO kv (k, v) VALUES ('down{n}', {n})"])
                async with Agent(cfg):
                    await wait_for(converged, timeout=90, what=f"resumed after restart {n}")
                    await b.execute([f"DELETE FROM kv WHERE k = 'down{n}'"])
                    await wait_for(converged, what=f"a delete after restart {n}")
            done.set()
            tg.cancel_scope.cancel()
        assert change_ids == list(range(1, len(change_ids) + 1)), change_ids
        assert len(change_ids) >= 7
        assert subs[0].reconnects >= 2  # it did lose its stream, twice at least


async def test_a_subscription_the_agent_no_longer_has_is_lost(tmp_path):
    async with Agent(agent_config(tmp_path, "a")) as a, AsyncClient(addr(a)) as client:
        async with client.resume("00000000-0000-0000-0000-000000000000", 3) as sub:
            with pytest.raises(SubscriptionLost, match="subscribe again"):
                await sub.__anext__()
        async with client.subscribe("SELECT nope FROM kv") as sub:
            with pytest.raises(Rejected, match="no such column"):
                await sub.__anext__()
