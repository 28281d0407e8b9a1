"""The admin socket in corrosion's framing (corro-admin: length-delimited JSON frames, serde's
enum encoding), as corrosion's own ``corrosion`` binary speaks it, and the maintenance commands
(``subs``, ``cluster rejoin/membership-states``, ``sync reconcile-gaps``, ``actor version``)
through our CLI, against real agents."""

from __future__ import annotations

import datetime
import json
import socket
import uuid
from typing import Any

import anyio
import apsw
import httpx
import pytest
from cli_helpers import cli, cluster, node_mapping, write_config
from support import wait_for

from corrosion import Agent, Config
from corrosion.logs import current_levels

pytestmark = pytest.mark.anyio


class CorroAdmin:
    """A client written from corro-admin's wire format, independently of the server: each frame
    a 4-byte big-endian length then JSON; a command answered by ``Log`` / ``Json`` frames and a
    final ``"Success"`` or ``{"Error": {"msg"}}`` (blocking; used from a worker thread)."""

    def __init__(self, path: Any) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))

    def _read(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def frame(self) -> Any:
        head = self._read(4)
        if head is None:
            return None
        body = self._read(int.from_bytes(head, "big"))
        assert body is not None, "connection closed inside a frame"
        return json.loads(body)

    def send_raw(self, payload: bytes) -> None:
        self.sock.sendall(len(payload).to_bytes(4, "big") + payload)

    def command(self, command: Any) -> list[Any]:
        """Every response frame up to and including the final one."""
        self.send_raw(json.dumps(command).encode())
        out = []
        while True:
            response = self.frame()
            assert response is not None, f"closed before the end of {command!r}"
            out.append(response)
            if response == "Success" or (isinstance(response, dict) and "Error" in response):
                return out

    def close(self) -> None:
        self.sock.close()


async def corro(path: Any, *commands: Any) -> list[list[Any]]:
    """Send ``commands`` on one connection; their responses."""

    def talk() -> list[list[Any]]:
        c = CorroAdmin(path)
        try:
            return [c.command(cmd) for cmd in commands]
        finally:
            c.close()

    return await anyio.to_thread.run_sync(talk)


def jsons(responses: list[Any]) -> list[Any]:
    assert responses[-1] == "Success", responses
    return [r["Json"] for r in responses if isinstance(r, dict) and "Json" in r]


def logs(responses: list[Any]) -> list[str]:
    out = []
    for r in responses:
        if isinstance(r, dict) and "Log" in r:
            entry = r["Log"]
            assert entry["level"] == "info"
            # time::OffsetDateTime as serde's tuple: year, day of year, h, m, s, ns, offset h/m/s
            year, day, hour, minute, second, nanos, *offset = entry["ts"]
            when = datetime.datetime(year, 1, 1, hour, minute, second, tzinfo=datetime.UTC)
            when += datetime.timedelta(days=day - 1)
            now = datetime.datetime.now(datetime.UTC)
            assert abs((now - when).total_seconds()) < 600 and 0 <= nanos < 10**9
            assert offset == [0, 0, 0]
            out.append(entry["msg"])
    return out


def error(responses: list[Any]) -> str:
    [response] = responses
    return response["Error"]["msg"]


async def test_corrosion_framing_answers_corrosions_commands(base):
    async with cluster(base, 2) as (a, b):
        sock = a.config.admin_path
        host, port = a.api_addrs[0]
        await b.execute(["INSERT INTO todos (id, title) VALUES (1, 'from b')"])
        await wait_for(lambda: a.store.bookie.holds(b.actor_id, 1), what="b's version on a")
        async with (
            httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as http,
            http.stream("POST", "/v1/subscriptions", json="SELECT id, title FROM todos") as sub,
        ):
            sub_id, sub_hash = sub.headers["corro-query-id"], sub.headers["corro-query-hash"]
            b_uuid = str(uuid.UUID(bytes=b.actor_id))  # corrosion's ActorId: a UUID
            (
                ping,
                sync,
                members,
                states,
                subs,
                info_hash,
                info_id,
                no_key,
                version,
                unknown_version,
                rejoin,
                reconcile,
            ) = await corro(
                sock,
                "Ping",
                {"Sync": "Generate"},
                {"Cluster": "Members"},
                {"Cluster": "MembershipStates"},
                {"Subs": "List"},
                {"Subs": {"Info": {"hash": sub_hash, "id": None}}},
                {"Subs": {"Info": {"hash": None, "id": sub_id}}},
                {"Subs": {"Info": {"hash": None, "id": None}}},
                {"Actor": {"Version": {"actor_id": b_uuid, "version": 1}}},
                {"Actor": {"Version": {"actor_id": b_uuid, "version": 99}}},
                {"Cluster": "Rejoin"},
                {"Sync": "ReconcileGaps"},
            )
        assert ping == ["Success"]
        [state] = jsons(sync)
        assert state["actor_id"] == a.actor_id.hex() and b.actor_id.hex() in state["heads"]
        assert len(jsons(members)) == 2  # one frame per member, as corrosion sends them
        [other] = jsons(states)
        assert (other["actor_id"], other["state"]) == (b.actor_id.hex(), "Alive")
        [listed] = jsons(subs)
        assert [(s["id"], s["hash"]) for s in listed] == [(sub_id, sub_hash)]
        assert jsons(info_hash) == jsons(info_id)
        [info] = jsons(info_id)
        assert info["original_query"] == "SELECT id, title FROM todos" and info["rows"] == 1
        assert error(no_key) == "specify the subscription's hash or id"
        [held] = jsons(version)
        assert set(held["current"]) == {"db_version", "last_seq"}
        assert jsons(unknown_version) == ["cleared or unknown"]
        assert logs(rejoin) == ["rejoined the cluster: 1 members answered"]
        assert logs(reconcile) == ["reconciling gaps for 1 actors..."]  # b: a wrote nothing

        before = current_levels()
        set_, reset = await corro(sock, {"Log": {"Set": {"filter": "debug"}}}, {"Log": "Reset"})
        assert logs(set_) == ["log filter: debug"] and reset[-1] == "Success"
        assert current_levels() == before


async def test_corrosion_framing_refuses_what_does_not_apply_and_survives_bad_frames(base):
    cfg = Config.from_mapping(node_mapping(base, "a", api=None))
    async with Agent(cfg, serve_api=False):
        sock = cfg.admin_path
        replies = await corro(
            sock,
            "ReloadDicts",
            {"Plumtree": "Stats"},
            {"Cluster": {"SetId": 3}},
            {"Sync": "Explode"},
            {"Actor": {"Version": {"actor_id": "not-a-uuid", "version": 1}}},
            {"Cluster": "Rejoin"},  # nobody to rejoin through
            "Ping",
        )
        assert "ReloadDicts does not apply" in error(replies[0])
        assert "plumtree is not in use here" in error(replies[1])  # fan-out by default
        assert "Cluster SetId does not apply" in error(replies[2])
        assert "unknown corrosion admin command Sync Explode" in error(replies[3])
        assert "is not a UUID" in error(replies[4])
        assert "nobody to rejoin through" in error(replies[5])
        assert replies[6] == ["Success"]

        def garbage_then_oversize() -> tuple[list[Any], list[Any], Any]:
            c = CorroAdmin(sock)
            try:
                c.send_raw(b"{not json")
                bad = [c.frame()]
                ping = c.command("Ping")  # the connection is still usable
                c.sock.sendall((64 << 20).to_bytes(4, "big"))  # announces 64 MiB
                return bad, ping, (c.frame(), c.frame())
            finally:
                c.close()

        bad, ping, (refused, after) = await anyio.to_thread.run_sync(garbage_then_oversize)
        assert "not valid JSON" in error(bad) and ping == ["Success"]
        assert "longer than" in refused["Error"]["msg"] and after is None  # then closed


async def test_maintenance_commands_through_our_cli(base):
    async with cluster(base, 2) as (a, b):
        cfg = write_config(base / "a.toml", node_mapping(base, "a0"))
        admin = ["--admin-path", str(a.config.admin_path), "-c", str(cfg)]
        await a.execute(["INSERT INTO todos (id, title) VALUES (1, 'x')"])

        result = await cli(*admin, "actor", "version", a.actor_id.hex(), "1")
        assert result.exit_code == 0, result.output
        assert set(json.loads(result.output)["current"]) == {"db_version", "last_seq"}
        unknown = await cli(*admin, "actor", "version", uuid.uuid4().hex, "1")
        assert unknown.exit_code == 1 and "unknown actor id" in unknown.output

        states = json.loads((await cli(*admin, "cluster", "membership-states")).output)
        assert [s["actor_id"] for s in states] == [b.actor_id.hex()]
        result = await cli(*admin, "cluster", "rejoin")
        assert result.exit_code == 0 and "rejoined: 1 of 1 members asked answered" in result.output

        host, port = a.api_addrs[0]
        async with (
            httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as http,
            http.stream("POST", "/v1/subscriptions", json="SELECT title FROM todos") as sub,
        ):
            listed = json.loads((await cli(*admin, "subs", "list")).output)
            assert [s["hash"] for s in listed] == [sub.headers["corro-query-hash"]]
            assert listed[0]["listeners"] == 1
            info = await cli(*admin, "subs", "info", "--id", sub.headers["corro-query-id"])
            assert json.loads(info.output)["tables"] == ["todos"]
        missing = await cli(*admin, "subs", "info")
        assert missing.exit_code == 1 and "pass --hash or --id" in missing.output

        # a gaps table that disagrees with the bookkeeping (rows written behind the agent's
        # back) is rewritten; run again, nothing is left to do
        bogus = uuid.uuid4().bytes
        with apsw.Connection(str(a.config.db.path)) as conn:
            conn.setbusytimeout(30_000)
            conn.execute(
                'INSERT INTO __corro_bookkeeping_gaps (actor_id, start, "end") VALUES (?, 5, 9)',
                (bogus,),
            )
        result = await cli(*admin, "sync", "reconcile-gaps")
        assert result.exit_code == 0, result.output
        assert f"reconciled {bogus.hex()}: 1 gap rows replaced by 0" in result.output
        again = await cli(*admin, "sync", "reconcile-gaps")
        assert again.output.splitlines() == [
            f"gaps consistent for {len(a.store.bookie.actors)} actors"
        ]
        with apsw.Connection(str(a.config.db.path), flags=apsw.SQLITE_OPEN_READONLY) as conn:
            left = conn.execute("SELECT count(*) FROM __corro_bookkeeping_gaps").fetchone()
        assert left == (0,)
