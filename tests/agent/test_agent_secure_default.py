"""Secure by default: an agent needs a gossip key (or an explicit ``plaintext = true``), and with
one, an outsider on the network can neither join its membership (SWIM datagrams and push/pull
streams) nor write rows through its peer streams, nor replay a member's recorded stream."""

from __future__ import annotations

import base64
import logging
import time

import anyio
import pytest
from agent_helpers import TEST_KEY, agent_config, rows
from anyio.abc import ByteStream
from support import wait_for

import crdt
import swim
from corrosion import Agent
from corrosion.config import ConfigError, format_addr
from corrosion.core.changeset import K_HELLO, Changeset, encode_changeset, encode_control
from corrosion.runtime.transport import PEER_PREAMBLE, FrameStream, connect
from corrosion.surfaces.metrics import collect, render
from swim import codec
from swim.member import NodeId

pytestmark = pytest.mark.anyio

WRONG_KEY = base64.b64encode(b"W" * 32).decode()
LABEL = b"corrosion/0"  # cluster 0's label: SWIM frames' and peer streams' associated data
INTRUDER = bytes(range(16))  # the actor id the outsider claims


def _keyring(key: str | None) -> swim.Keyring | None:
    return swim.Keyring([base64.b64decode(key)]) if key else None


async def test_without_a_key_the_agent_refuses_to_start(tmp_path, caplog):
    no_key = {"encryption_keys": []}
    cfg = agent_config(tmp_path, "a", gossip=no_key)  # loads: client commands still work
    with pytest.raises(ConfigError, match=r"^gossip\.encryption_keys: required, or gossip\."
                       r"plaintext = true .*corrosion keygen"):  # fmt: skip
        await Agent(cfg).start()
    assert not (tmp_path / "a").exists()  # failed before creating anything

    tls = {"cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem")}
    cfg = agent_config(tmp_path, "b", gossip={**no_key, "tls": tls})
    with pytest.raises(ConfigError, match=r"not SWIM's UDP datagrams"):
        await Agent(cfg).start()  # TLS covers the peer streams only

    cfg = agent_config(tmp_path, "c", gossip={"plaintext": True})  # and the test key
    with pytest.raises(ConfigError, match=r"^gossip\.plaintext: true contradicts"):
        await Agent(cfg).start()

    caplog.set_level(logging.WARNING, logger="corrosion.agent")
    cfg = agent_config(tmp_path, "d", gossip={**no_key, "plaintext": True})
    async with Agent(cfg) as agent:
        bound = format_addr(agent.swim.address)
    assert not bound.endswith(":0")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # the port the agent bound, not the configured 0
    assert warnings == [
        f"gossip.plaintext = true: gossip on {bound} is not authenticated; anything that reaches "
        "it can join the cluster and write rows (set gossip.encryption_keys)"
    ]


async def test_api_beyond_loopback_without_a_token_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="corrosion.agent")
    async with Agent(agent_config(tmp_path, "a", api={"addr": "0.0.0.0:0"})) as agent:
        bound = format_addr(agent.api_addrs[0])
    async with Agent(agent_config(tmp_path, "b", api={"addr": "127.0.0.1:0"})):
        pass
    async with Agent(
        agent_config(tmp_path, "c", api={"addr": "0.0.0.0:0", "authz": {"bearer-token": "t"}})
    ):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"api.addr {bound} is reachable beyond this machine")
    assert bound.startswith("0.0.0.0:") and bound != "0.0.0.0:0"


def _datagram(key: str | None, target: NodeId, fake: NodeId) -> bytes:
    """A ping for the agent and an ALIVE announcing ``fake``, framed as a member would."""
    body = codec.encode_body(
        codec.pack_id(fake), [codec.ping(1, target), codec.alive(fake, 1, b"")]
    )
    return codec.Framer(LABEL, _keyring(key)).seal(body)


def _intruder_frames(version: int) -> list[bytes]:
    """A broadcast stream's hello and one changeset writing kv row 'intruder-<version>'."""
    change = crdt.Change("kv", crdt.pack_pk([f"intruder-{version}"]), "v", "x", 1, 1, None, 1, 0)
    ts = int(time.time() * 1000) << 16
    changeset = Changeset(INTRUDER, version, (change,), (0, 0), 0, ts, 1)
    return [encode_control(K_HELLO, 0, INTRUDER, "bcast"), encode_changeset(changeset)]


async def _push(agent: Agent, key: str | None, version: int) -> None:
    """Open a peer stream to ``agent`` (with ``key``, or none), push the intruder's frames and
    wait until the agent ends the stream."""
    host, port = agent.peer_addr
    stream = await connect(host, port, keyring=_keyring(key), aad=LABEL)
    async with stream.stream:
        for frame in _intruder_frames(version):
            await stream.send(frame)
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
            with anyio.fail_after(30):
                while True:
                    await stream.stream.receive()


class _Recorder(ByteStream):
    """A byte stream that keeps what was sent through it (the attacker's capture)."""

    def __init__(self, inner: ByteStream) -> None:
        self.inner = inner
        self.sent = bytearray()

    async def send(self, item: bytes) -> None:
        self.sent += item
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _metric(agent: Agent, line_start: str) -> float:
    for line in render(collect(agent)).splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


async def test_an_outsider_cannot_join_or_write(tmp_path):
    async with Agent(agent_config(tmp_path, "a", with_api=False)) as a:  # keyed, as required
        host, port = a.swim.address
        target = a.swim.identity
        fake = NodeId("127.0.0.1", 9, 1)

        # (1) SWIM: a ping and an ALIVE, in plaintext and sealed with another key, over UDP;
        # and a real SWIM node of each kind asking to join (a push/pull stream over TCP)
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
            for key in (None, WRONG_KEY):
                await udp.sendto(_datagram(key, target, fake), host, port)
        for keyring in (None, _keyring(WRONG_KEY)):
            cfg = swim.Config.local(label=LABEL.decode())
            async with swim.SwimNode(cfg, keyring=keyring) as outsider:
                assert await outsider.join([(host, port)], timeout=10) == 0
        await wait_for(
            lambda: (
                a.swim.stats.dropped.get("plaintext", 0) >= 2
                and a.swim.stats.dropped.get("decrypt", 0) >= 2
            ),
            what="the outsider's datagrams and join streams to be dropped and counted",
        )
        assert a.swim.all_members() == []
        assert [m.is_self for m in a.members()] == [True]
        assert _metric(a, 'corro_swim_malformed_total{reason="plaintext"}') >= 2
        assert _metric(a, 'corro_swim_malformed_total{reason="decrypt"}') >= 2

        # (2) peer streams: the hello and a changeset, in plaintext and with another key
        await _push(a, None, 1)
        await _push(a, WRONG_KEY, 2)
        await wait_for(
            lambda: a.events.peer_streams_unauthenticated == 2, what="both streams to be cut"
        )
        assert _metric(a, "corro_peer_streams_unauthenticated_total") == 2
        assert await rows(a, "SELECT count(*) FROM kv") == [(0,)]
        assert not a.store.bookie.holds(INTRUDER, 1) and not a.store.bookie.holds(INTRUDER, 2)

        # the same frames with the cluster's key do get in: what kept them out was the key
        raw = await anyio.connect_tcp(*a.peer_addr)
        await raw.send(PEER_PREAMBLE)
        recorder = _Recorder(raw)
        member = FrameStream(recorder, _keyring(TEST_KEY), LABEL)
        async with raw:
            await member.handshake(client=True)
            for frame in _intruder_frames(3):
                await member.send(frame)

            async def written() -> bool:
                return await rows(a, "SELECT k FROM kv") == [("intruder-3",)]

            await wait_for(written, what="the keyed stream's row")
        assert a.events.peer_streams_unauthenticated == 2

        # replaying that recorded stream byte for byte is refused: the agent's nonce differs
        async with await anyio.connect_tcp(*a.peer_addr) as replay:
            await replay.send(PEER_PREAMBLE + bytes(recorder.sent))
            await wait_for(
                lambda: a.events.peer_streams_unauthenticated == 3, what="the replay to be cut"
            )
        # control: the crafted ALIVE sealed with the key is accepted, so the ones above were
        # refused for their key, not for their form
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
            await udp.sendto(_datagram(TEST_KEY, target, fake), host, port)
        await wait_for(
            lambda: any(m.addr == fake.addr for m in a.swim.all_members()),
            what="the keyed ALIVE to be accepted",
        )
