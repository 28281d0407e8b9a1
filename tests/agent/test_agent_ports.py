"""Peer streams (broadcasts, sync) use the gossip port: one port, UDP and TCP, is all an agent
listens on for its peers, as memberlist-based deployments expect of their firewalls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agent_helpers import cluster, rows
from support import wait_for

pytestmark = pytest.mark.anyio


async def test_peer_streams_share_the_gossip_port(tmp_path):
    before = listening_tcp_ports()  # earlier tests in this process may leave listeners behind
    async with cluster(tmp_path, 3, with_api=False) as agents:
        for a in agents:
            assert a.peer_addr == a.swim.address
            for m in a.members():
                assert m.peer_addr == m.addr
        await agents[1].execute(["INSERT INTO kv (k, v) VALUES ('p', 1)"])
        for a in agents:
            await wait_for(lambda a=a: _has(a), what="the write on every node")
        opened = listening_tcp_ports() - before
        assert opened == {a.swim.address[1] for a in agents}  # no second TCP port per agent


async def _has(agent) -> bool:
    return await rows(agent, "SELECT v FROM kv WHERE k = 'p'") == [(1,)]


def listening_tcp_ports() -> set[int]:
    """TCP ports this process listens on (Linux: its socket inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
