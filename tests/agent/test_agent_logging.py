"""What an operator reads at INFO: the start-up line with every bound address, members joining,
going down and leaving, schema changes, rejected and malformed input (throttled), and the periodic
sync summary; plus the pieces of ``corrosion.logs`` (level filters, JSON lines, throttling, the
summary's silence when idle) on an injected clock."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from agent_helpers import agent_config, cluster, rows, seed_addr
from support import wait_for
from test_agent_crash import AgentProcess

import swim
from corrosion import Agent
from corrosion.config import format_addr
from corrosion.core.changeset import K_HELLO, Changeset, encode, encode_control
from corrosion.logs import JsonFormatter, PlainFormatter, parse_levels, reset_levels, set_levels
from corrosion.runtime.activity import ActivityLog, GossipWarnings, Throttled, log_member_event
from corrosion.runtime.transport import connect
from crdt import Change

pytestmark = pytest.mark.anyio


def records(caplog, logger: str, prefix: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.getMessage().startswith(prefix)]


def fields(record: logging.LogRecord) -> dict:
    return getattr(record, "fields", {})


# -- in-process agents -------------------------------------------------------------------------


async def test_startup_line_names_every_bound_address(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    handlers = list(logging.getLogger().handlers)
    cfg = agent_config(tmp_path, "a", telemetry={"prometheus": {"addr": "127.0.0.1:0"}})
    async with Agent(cfg) as a:
        assert logging.getLogger().handlers == handlers  # the library configures no handler
        [started] = records(caplog, "corrosion.agent", "agent started")
        f = fields(started)
        assert f["actor_id"] == a.actor_id.hex()
        assert f["gossip_addr"] == format_addr(a.swim.address)
        assert f["api_addrs"] == [format_addr(x) for x in a.api_addrs]
        assert f["api_addrs"][0] != "127.0.0.1:0"  # the bound port, not the configured 0
        assert f["metrics_addr"] == format_addr(a.metrics_addr)
        assert f["admin_path"] == str(cfg.admin_socket())
        assert f["broadcast"] == "fanout"  # the mode a cluster must agree on, said at start
        assert stat.S_ISSOCK(os.stat(f["admin_path"]).st_mode)
        created = [fields(r)["change"] for r in records(caplog, "corrosion.schema", "schema")]
        assert sorted(created) == ["created table items", "created table kv"]
    assert records(caplog, "corrosion.agent", "agent stopped")


async def test_corrosion_settings_this_agent_does_not_use_are_each_named_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = agent_config(tmp_path, "a", gossip={"max_mtu": 1400}, reaper={"check_interval": 60})
    async with Agent(cfg):
        warned = [r.getMessage() for r in records(caplog, "corrosion.agent", "config: ignoring")]
    assert warned == [
        "config: ignoring reaper (a corrosion setting this agent does not use)",
        "config: ignoring gossip.max_mtu (a corrosion setting this agent does not use)",
    ]


async def test_startup_line_gives_the_admin_socket_absolute(tmp_path, caplog, monkeypatch):
    """A relative db.path puts the admin socket beside it: the line says where that is."""
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    cfg = agent_config(tmp_path, "a", with_api=False)
    cfg = dataclasses.replace(cfg, db=dataclasses.replace(cfg.db, path=Path("a/state.db")))
    async with Agent(cfg):
        [started] = records(caplog, "corrosion.agent", "agent started")
        path = fields(started)["admin_path"]
        assert path == str(tmp_path / "a" / "state.db.admin.sock")
        assert stat.S_ISSOCK(os.stat(path).st_mode)


async def test_members_joining_going_down_and_leaving_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path, 2, with_api=False) as (a, b):
        proc = AgentProcess(tmp_path, [seed_addr(a)])
        try:
            await proc.start()
            await wait_for(lambda: a.alive_members() == 2, what="the process agent to join")
            b_addr = format_addr(b.swim.address)

            def joined_on_a() -> set[str]:
                return {
                    fields(r)["addr"] for r in records(caplog, "corrosion.members", "member joined")
                }

            assert b_addr in joined_on_a()
            others = joined_on_a() - {b_addr, format_addr(a.swim.address)}
            assert len(others) == 1, joined_on_a()
            (proc_addr,) = others
            proc.kill()

            def down(addr: str) -> bool:
                return any(
                    fields(r)["addr"] == addr
                    for r in records(caplog, "corrosion.members", "member down")
                )

            await wait_for(lambda: down(proc_addr), what="'member down' for the killed agent")
            msg = records(caplog, "corrosion.members", "member down")[0].getMessage()
            assert proc_addr in msg and "actor" in msg
        finally:
            proc.stop()
        await b.aclose()  # a graceful stop: the others log that it left, not that it failed
        await wait_for(
            lambda: any(
                fields(r)["addr"] == b_addr
                for r in records(caplog, "corrosion.members", "member left")
            ),
            what="'member left' for the agent that stopped",
        )


async def test_schema_changes_are_logged_on_reload(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = agent_config(tmp_path, "a", with_api=False)
    async with Agent(cfg) as a:
        caplog.clear()
        schema = cfg.db.schema_paths[0]
        schema.write_text(
            schema.read_text() + "CREATE TABLE extra (id INTEGER NOT NULL PRIMARY KEY, note TEXT);"
        )
        assert await a.reload_schema() == ["created table extra"]
        [applied] = records(caplog, "corrosion.schema", "schema applied")
        assert applied.getMessage() == "schema applied: created table extra"
        caplog.clear()
        assert await a.reload_schema() == []
        assert records(caplog, "corrosion.schema", "schema unchanged")
        assert not records(caplog, "corrosion.schema", "schema applied")


def bad_pk_changeset(actor: bytes, version: int, ts: int) -> Changeset:
    change = Change("kv", b"\xff\x00garbage", "v", "x", 1, 1, actor, 1, 0)
    return Changeset(actor, version, (change,), (0, 0), 0, ts)


async def test_rejected_changesets_are_logged_once_per_reason(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = agent_config(tmp_path, "a", with_api=False, log={"summary_interval": 600.0})
    async with Agent(cfg) as a:
        host, port = a.swim.address
        outsider = os.urandom(16)
        hello = encode_control(K_HELLO, a.config.gossip.cluster_id, outsider, "bcast")
        security = a.peers.security
        stream = await connect(
            host, port, keyring=security.keyring, aad=security.aad, ssl_context=None
        )
        async with stream.stream:
            await stream.send(hello)
            ts = a.replicator.hlc.now()
            for version in range(1, 101):
                await stream.send(encode(bad_pk_changeset(outsider, version, ts)))
            await stream.send(b"\x93not a frame")
            await wait_for(
                lambda: a.replicator.stats.rejected_changesets == 100,
                what="the 100 bad changesets to be rejected",
            )
            await wait_for(
                lambda: bool(records(caplog, "corrosion.apply", "malformed frame")),
                what="the malformed frame to be logged",
            )
        [rejected] = records(caplog, "corrosion.apply", "changeset rejected")
        assert rejected.levelno == logging.WARNING
        assert "malformed pk for table kv" in rejected.getMessage()
        assert fields(rejected)["actor_id"] == outsider.hex()
        [malformed] = records(caplog, "corrosion.apply", "malformed frame")
        assert outsider.hex() in malformed.getMessage()
        assert await rows(a, "SELECT count(*) FROM kv") == [(0,)]


async def test_sync_summary_says_what_was_pulled_and_from_whom(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    sections = {"perf": {"broadcast": False}, "log": {"summary_interval": 0.5}}
    async with cluster(tmp_path, 2, with_api=False, **sections) as (a, b):
        for i in range(5):
            await a.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", i]]])
        a_addr = format_addr(a.swim.address)

        def pulled_from_a() -> int:
            return sum(
                fields(r)["pulled_from"].get(a_addr, 0)
                for r in records(caplog, "corrosion.sync", "sync summary")
            )

        await wait_for(lambda: pulled_from_a() == 5, what="b's summaries to count 5 pulls")
        line = next(
            r.getMessage()
            for r in records(caplog, "corrosion.sync", "sync summary")
            if fields(r)["pulled"]
        )
        assert f"changesets pulled ({a_addr}=" in line
        served = [fields(r)["served"] for r in records(caplog, "corrosion.sync", "sync summary")]
        assert sum(served) >= 5  # a's side: what it sent
        # b applied 5 rows of two columns each (v, n): 10 changes, and says changes, not rows
        summaries = records(caplog, "corrosion.sync", "sync summary")
        assert sum(fields(r).get("applied_changes", 0) for r in summaries) == 10
        assert any(
            "remote versions applied (" in r.getMessage() and " changes)" in r.getMessage()
            for r in summaries
        )
        assert await rows(b, "SELECT count(*) FROM kv") == [(5,)]


async def test_debug_shows_each_frame_and_sync(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="corrosion.broadcast")
    caplog.set_level(logging.DEBUG, logger="corrosion.sync")
    async with cluster(tmp_path, 2, with_api=False) as (a, b):
        await a.execute([["INSERT INTO kv (k, v) VALUES ('x', 1)"]])
        await wait_for(lambda: rows(b, "SELECT v FROM kv"), what="the write to reach b")
        version = f"changeset {a.actor_id.hex()}:1 seqs 0.."
        await wait_for(
            lambda: any(
                version in r.getMessage()
                for r in records(caplog, "corrosion.broadcast", "frame to")
            ),
            what="a DEBUG line for the frame a sent",
        )
        await wait_for(
            lambda: any(
                version in r.getMessage()
                for r in records(caplog, "corrosion.broadcast", "frame from")
            ),
            what="a DEBUG line for the frame b received",
        )
        await wait_for(
            lambda: bool(records(caplog, "corrosion.sync", "sync with")),
            what="DEBUG lines for sync sessions",
        )


# -- corrosion.logs on its own -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_throttled_logs_the_first_then_counts_repeats(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    t = Throttled(logging.getLogger("test.throttle"), 10.0, clock)
    for _ in range(50):
        t.log("reason-a", "bad thing %s", "a")
    t.log("reason-b", "bad thing %s", "b")
    assert [r.getMessage() for r in caplog.records] == ["bad thing a", "bad thing b"]
    t.flush()  # the interval is not over: nothing yet
    assert len(caplog.records) == 2
    clock.t = 10.0
    t.flush()
    assert caplog.records[-1].getMessage() == "bad thing a (and 49 more like it in the last 10s)"
    assert caplog.records[-1].fields["repeats"] == 49
    assert len(caplog.records) == 3  # reason-b had no repeats
    clock.t = 25.0
    t.flush()
    t.log("reason-a", "bad thing %s", "a")
    assert caplog.records[-1].getMessage() == "bad thing a"
    assert len(caplog.records) == 4


def test_gossip_warnings_count_unreadable_gossip_per_source(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    w = GossipWarnings(10.0, clock)
    a, b = ("10.0.0.1", 8787), ("10.0.0.2", 8787)
    w.dropped(("10.0.0.1", 50123), "decrypt", "stream")  # at once
    for _ in range(4):
        w.dropped(a, "decrypt", "datagram")
    w.dropped(b, "plaintext", "datagram")  # another source: at once too
    w.dropped(b, "label", "datagram")  # another cluster: not a key problem
    w.dropped(b, "decode", "datagram")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "1 gossip stream from 10.0.0.1 could not be decrypted with any of "
        "gossip.encryption_keys: a node with another key? (the nodes of a cluster need a key "
        "in common in gossip.encryption_keys)",
        "1 gossip datagram from 10.0.0.2:8787 came unencrypted, and this node requires "
        "gossip.encryption_keys: a node with gossip.plaintext = true? (a cluster's nodes either "
        "all have gossip.encryption_keys or all run plaintext)",
    ]
    assert all(
        r.levelno == logging.WARNING and r.name == "corrosion.members" for r in caplog.records
    )
    w.flush()  # the interval is not over
    assert len(caplog.records) == 2
    clock.t = 10.0
    w.flush()  # a's datagrams since its line; b had nothing more
    assert (
        caplog.records[-1]
        .getMessage()
        .startswith("4 gossip datagrams from 10.0.0.1:8787 in the last 10s could not be decrypted")
    )
    assert fields(caplog.records[-1])["datagrams"] == 4
    assert len(caplog.records) == 3
    clock.t = 15.0
    w.dropped(a, "decrypt", "datagram")
    w.dropped(("10.0.0.1", 50124), "decrypt", "stream")
    clock.t = 20.0
    w.dropped(a, "decrypt", "datagram")  # the interval is over: this one writes the line
    assert (
        caplog.records[-1]
        .getMessage()
        .startswith("2 gossip datagrams and 1 stream from 10.0.0.1:8787 in the last 10s")
    )
    clock.t = 40.0
    w.flush()
    w.flush()
    assert len(caplog.records) == 4  # quiet sources write nothing and are forgotten
    w.dropped(a, "decrypt", "datagram")
    assert caplog.records[-1].getMessage().startswith("1 gossip datagram from 10.0.0.1:8787 could")


def test_gossip_warnings_say_when_no_seed_answers(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    w = GossipWarnings(10.0, clock)
    seeds = ["10.0.0.1:8787", "10.0.0.2:8787"]
    w.join_unanswered(seeds, 1)
    w.join_unanswered(seeds, 2)  # seeds may still be starting: nothing yet
    assert caplog.records == []
    w.join_unanswered(seeds, 3)
    clock.t = 9.0
    w.join_unanswered(seeds, 4)  # within the interval: the next line will count it
    assert [r.getMessage() for r in caplog.records] == [
        "no answer from bootstrap 10.0.0.1:8787, 10.0.0.2:8787 after 3 attempts: is it running, "
        "and does it share gossip.encryption_keys (and gossip.cluster_id)?"
    ]
    clock.t = 10.0
    w.join_unanswered(seeds, 5)
    assert len(caplog.records) == 2
    assert "after 5 attempts:" in caplog.records[-1].getMessage()
    assert fields(caplog.records[-1])["attempts"] == 5


def test_activity_log_is_silent_when_idle(caplog):
    caplog.set_level(logging.INFO)
    activity = ActivityLog(5.0, Clock())
    activity.sync_session("10.0.0.1:8787", 0, ok=True)
    activity.sync_served("10.0.0.1:8787", 0)
    activity.tick()  # sessions that moved nothing are not news
    assert caplog.records == []
    activity.sync_session("10.0.0.1:8787", 3, ok=True)
    activity.sync_session("10.0.0.2:8787", 0, ok=False)
    activity.applied(3, 7)
    activity.tick()
    [line] = caplog.records
    assert line.name == "corrosion.sync"
    assert line.getMessage() == (
        "sync summary (5s): 0 local versions committed; 3 remote versions applied (7 changes); "
        "2 syncs asked, 1 failed (10.0.0.2:8787=1), 3 changesets pulled (10.0.0.1:8787=3); "
        "0 syncs answered"
    )
    activity.tick()
    assert len(caplog.records) == 1


def test_level_filters_parse_apply_and_reset():
    assert parse_levels("debug") == {"": logging.DEBUG}
    assert parse_levels("corrosion.sync=debug, warn") == {
        "": logging.WARNING,
        "corrosion.sync": logging.DEBUG,
    }
    assert parse_levels("") == {"": logging.INFO}
    for bad in ("verbose", "corrosion=loud", "=debug", "info,x=y"):
        with pytest.raises(ValueError):
            parse_levels(bad)
    root, sync = logging.getLogger(), logging.getLogger("corrosion.sync")
    before = root.level, sync.level
    try:
        set_levels("error,corrosion.sync=debug")
        assert (root.level, sync.level) == (logging.ERROR, logging.DEBUG)
        assert logging.getLogger("uvicorn").level == logging.WARNING
        set_levels("info")  # a new filter replaces the whole old one
        assert (root.level, sync.level) == (logging.INFO, logging.NOTSET)
        with pytest.raises(ValueError):
            set_levels("nonsense")
        assert root.level == logging.INFO  # a bad filter changes nothing
    finally:
        reset_levels()
    assert (root.level, sync.level) == before


def test_json_and_plain_formats():
    record = logging.LogRecord(
        "corrosion.members", logging.INFO, __file__, 1, "hi %s", ("x",), None
    )
    record.fields = {"addr": "127.0.0.1:1", "n": 0, "peers": {"a": 1}}
    out = json.loads(JsonFormatter().format(record))
    assert out["level"] == "INFO" and out["target"] == "corrosion.members"
    assert out["msg"] == "hi x" and out["addr"] == "127.0.0.1:1" and out["peers"] == {"a": 1}
    assert out["ts"].endswith("Z") and "T" in out["ts"]
    plain = PlainFormatter(colors=False).format(record)
    assert plain.endswith(" INFO corrosion.members: hi x addr=127.0.0.1:1")


def test_every_membership_event_has_a_line(caplog):
    caplog.set_level(logging.INFO)
    node = swim.NodeId("10.0.0.9", 8787, 1)
    m = swim.Member(node, 3, swim.State.ALIVE)
    left = swim.Member(node, 3, swim.State.LEFT)
    down = swim.Member(node, 3, swim.State.DOWN)
    events = [
        swim.MemberUp(m),
        swim.MemberSuspect(m),
        swim.MemberAlive(m),
        swim.MemberDown(down),
        swim.MemberDown(left),
    ]
    for ev in events:
        log_member_event(ev, lambda mem: ("ab" * 16, format_addr(mem.addr)))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "member joined",
        "member suspected",
        "member alive again",
        "member down",
        "member left",
    ]
    assert all("10.0.0.9:8787" in r.getMessage() for r in caplog.records)


def test_a_restarted_member_is_said_to_have_a_new_actor_only_when_it_has_one(caplog):
    """A node restarted with its database keeps its actor id: "is now actor" (the same id)
    read as if it had lost its identity."""
    caplog.set_level(logging.INFO)
    old, new = swim.NodeId("10.0.0.9", 8787, 1), swim.NodeId("10.0.0.9", 8787, 2)
    renamed = swim.MemberRenamed(
        swim.Member(old, 3, swim.State.DOWN), swim.Member(new, 0, swim.State.ALIVE)
    )
    log_member_event(renamed, lambda mem: ("ab" * 16, format_addr(mem.addr)))
    actors = {1: "ab" * 16, 2: "cd" * 16}
    log_member_event(renamed, lambda mem: (actors[mem.id.gen], format_addr(mem.addr)))
    same, changed = (r.getMessage() for r in caplog.records)
    assert same == f"member restarted: 10.0.0.9:8787 (actor {'ab' * 16})"
    assert changed == f"member restarted: 10.0.0.9:8787 is now actor {'cd' * 16}"
