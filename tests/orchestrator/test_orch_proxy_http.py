"""The proxy served over real HTTP (``corrosion.asgi_server``: uvicorn on asyncio, hypercorn on
trio) in front of a machine's real HTTP server: each response carries one ``date`` and one
``server`` header, not the machine's and the proxy's server's both, and kept-alive connections
to the proxy have TCP_NODELAY."""

from __future__ import annotations

import anyio
import apsw
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from corrosion.surfaces.asgi_server import serve_asgi
from orchestrator.proxy import Proxy, SqliteReplica
from orchestrator.publish import MACHINES_SCHEMA, upsert_statement

pytestmark = pytest.mark.anyio


async def hello(request):
    return PlainTextResponse("hello\n")


def route_to(path, port: int) -> None:
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(MACHINES_SCHEMA)
    sql, params = upsert_statement(
        {"id": "m1", "app": "web", "worker": "w1", "region": "", "state": "started",
         "instance_id": "", "address": "127.0.0.1", "cordoned": 0, "checks": "[]",
         "services": f'[{{"protocol":"tcp","internal_port":{port}}}]', "updated_at": 0}
    )  # fmt: skip
    conn.execute(sql, params)
    conn.close()


async def test_proxied_responses_have_one_date_and_server(tmp_path, accepted_nodelay):
    replica = None
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            machine = await serve_asgi(Starlette(routes=[Route("/", hello)]), tg, "127.0.0.1", 0)
            route_to(tmp_path / "replica.db", machine.address[1])
            replica = SqliteReplica(tmp_path / "replica.db")
            proxy = Proxy(replica, domain="example.test")
            front = await serve_asgi(proxy, tg, "127.0.0.1", 0, lifespan=True)
            async with httpx.AsyncClient(timeout=30) as client:
                direct = await client.get(f"http://127.0.0.1:{machine.address[1]}/")
                # the machine's server writes its own
                assert len(direct.headers.get_list("server")) == 1
                assert len(direct.headers.get_list("date")) == 1
                url = f"http://127.0.0.1:{front.address[1]}/"
                for _ in range(3):  # one kept-alive connection
                    r = await client.get(url, headers={"host": "web.example.test"})
                    assert r.status_code == 200 and r.text == "hello\n"
                    assert r.headers["fly-machine-id"] == "m1"
                    assert len(r.headers.get_list("server")) == 1, r.headers
                    assert len(r.headers.get_list("date")) == 1, r.headers
                peer = r.extensions["network_stream"].get_extra_info("client_addr")
                assert accepted_nodelay(peer) is True
                missing = await client.get(url, headers={"host": "nope.example.test"})
                assert missing.status_code == 503
                assert len(missing.headers.get_list("server")) == 1
            front.close()
            machine.close()
    replica.close()
