"""Cluster ids keep clusters apart; encrypted gossip and peer streams work with the right key and
keep out nodes with another one; TLS on the peer streams."""

from __future__ import annotations

import base64
import logging

import pytest
from agent_helpers import agent_config, cluster, rows, seed_addr
from support import self_signed_cert, wait_for

import swim
from corrosion import Agent
from corrosion.addresses import format_addr
from corrosion.runtime.transport import connect

pytestmark = pytest.mark.anyio

KEY_A = base64.b64encode(b"A" * 32).decode()
KEY_B = base64.b64encode(b"B" * 32).decode()


async def test_other_cluster_never_joins_or_replicates(tmp_path):
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip={"cluster_id": 1})) as a:
        cfg = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, gossip={"cluster_id": 2})
        async with Agent(cfg) as b:
            await a.execute(["INSERT INTO kv (k) VALUES ('from a')"])
            # b keeps trying to join: a has turned it away more than once (its packets carry the
            # other cluster's label), so nothing can have crossed
            await wait_for(lambda: a.swim.stats.malformed >= 2, what="a to refuse b's joins")
            assert a.alive_members() == 0 and b.alive_members() == 0
            assert await rows(b, "SELECT count(*) FROM kv") == [(0,)]


async def test_encrypted_cluster_and_a_node_with_the_wrong_key(tmp_path):
    enc = {"plaintext": False, "encryption_keys": [KEY_A]}
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip=enc)) as a:
        b_cfg = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, gossip=enc)
        wrong = {"plaintext": False, "encryption_keys": [KEY_B]}
        c_cfg = agent_config(tmp_path, "c", [seed_addr(a)], with_api=False, gossip=wrong)
        async with Agent(b_cfg) as b, Agent(c_cfg) as c:
            await wait_for(
                lambda: a.alive_members() == 1 and b.alive_members() == 1,
                what="a and b to meet over encrypted gossip",
            )
            await a.execute(["INSERT INTO kv (k) VALUES ('secret')"])

            async def arrived() -> bool:
                return await rows(b, "SELECT k FROM kv") == [("secret",)]

            await wait_for(arrived, what="the encrypted write to reach b")
            # c's joins were refused more than once: its packets were dropped and counted
            await wait_for(lambda: a.swim.stats.malformed >= 2, what="a to refuse c's joins")
            assert c.alive_members() == 0
            assert await rows(c, "SELECT count(*) FROM kv") == [(0,)]


UNDECRYPTABLE = (
    "could not be decrypted with any of gossip.encryption_keys: a node with another key?"
)


def key_warnings(caplog) -> tuple[list[str], list[str]]:
    """corrosion.members warnings: gossip no key opened, and joins no seed answered."""
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "corrosion.members" and r.levelno == logging.WARNING
    ]
    return [m for m in lines if UNDECRYPTABLE in m], [m for m in lines if "no answer from" in m]


async def test_a_node_with_another_key_is_warned_about_on_both_sides(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    enc = {"plaintext": False, "encryption_keys": [KEY_A]}
    quiet = {"summary_interval": 3600.0}  # one interval for the whole test: one line each
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip=enc, log=quiet)) as a:
        b_cfg = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, gossip=enc, log=quiet)
        wrong = {"plaintext": False, "encryption_keys": [KEY_B]}
        c_cfg = agent_config(tmp_path, "c", [seed_addr(a)], with_api=False, gossip=wrong, log=quiet)
        async with Agent(b_cfg) as b, Agent(c_cfg) as c:
            await wait_for(
                lambda: all(key_warnings(caplog)), what="warnings on a (receiver) and c (joiner)"
            )
            await wait_for(lambda: a.swim.stats.dropped.get("decrypt", 0) >= 3, what="3 joins")
            undecryptable, unanswered = key_warnings(caplog)
            # a: c's join streams, from 127.0.0.1 (a stream's source port is ephemeral); at
            # once, and no more lines until the interval is over
            assert undecryptable == [
                "1 gossip stream from 127.0.0.1 could not be decrypted with any of "
                "gossip.encryption_keys: a node with another key? (the nodes of a cluster need "
                "a key in common in gossip.encryption_keys)"
            ]
            # c: its seed never answered in a way it could read
            assert unanswered == [
                f"no answer from bootstrap {seed_addr(a)} after 3 attempts: is it running, and "
                "does it share gossip.encryption_keys (and gossip.cluster_id)?"
            ]
            await wait_for(lambda: a.alive_members() == b.alive_members() == 1, what="a, b")
            assert c.alive_members() == 0


async def test_a_peer_stream_sealed_with_another_key_is_warned_about(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    enc = {"plaintext": False, "encryption_keys": [KEY_A]}
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip=enc)) as a:
        host, port = a.swim.address
        stream = await connect(
            host, port, keyring=swim.Keyring([base64.b64decode(KEY_B)]), aad=b"corrosion/0"
        )
        await stream.send(b"hello from another cluster's key")
        await wait_for(lambda: a.events.peer_streams_unauthenticated == 1, what="the cut")
        await stream.aclose()
        assert key_warnings(caplog)[0] == [
            "1 gossip stream from 127.0.0.1 could not be decrypted with any of "
            "gossip.encryption_keys: a node with another key? (the nodes of a cluster need "
            "a key in common in gossip.encryption_keys)"
        ]


async def test_nodes_sharing_a_key_say_nothing_about_keys(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with cluster(tmp_path, 3, with_api=False) as agents:
        await agents[0].execute(["INSERT INTO kv (k) VALUES ('x')"])

        async def everywhere() -> bool:
            return all([await rows(a, "SELECT k FROM kv") == [("x",)] for a in agents])

        await wait_for(everywhere, what="the write to replicate")
        assert all(a.swim.stats.malformed == 0 for a in agents)
        assert key_warnings(caplog) == ([], [])


async def test_tls_peer_streams(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    tls = {  # TLS on the peer streams, the gossip key on everything (agent_config's default)
        "tls": {"cert_file": str(cert), "key_file": str(key), "ca_file": str(cert)},
    }
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip=tls)) as a:
        cfg = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, gossip=tls)
        async with Agent(cfg) as b:
            await wait_for(lambda: b.alive_members() == 1, what="b to join")
            await a.execute(["INSERT INTO kv (k) VALUES ('over tls')"])

            async def arrived() -> bool:
                return await rows(b, "SELECT k FROM kv") == [("over tls",)]

            await wait_for(arrived, what="the write to cross the TLS peer stream")


async def test_a_node_with_a_certificate_from_another_ca_is_warned_about_on_both_sides(
    tmp_path, caplog
):
    """b's certificate comes from another CA: SWIM (plain UDP) lists it alive, but no peer
    stream between a and b completes its handshake, so nothing replicates. Each node dials the
    other and says so at WARNING, naming the peer and the remedy (before, only a failed-sync
    count at INFO), once per peer and reason however many streams fail; and counts it on
    /metrics. (The dialed side sees only a hang-up: the dialer's ssl drops its alert.)"""
    caplog.set_level(logging.INFO)
    tls = {}
    for name in ("a", "b"):
        cert, key = self_signed_cert(tmp_path / f"ca-{name}")
        tls[name] = {"tls": {"cert_file": str(cert), "key_file": str(key), "ca_file": str(cert)}}
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip=tls["a"])) as a:
        cfg = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, gossip=tls["b"])
        async with Agent(cfg) as b:
            await wait_for(lambda: b.alive_members() == 1, what="b to join SWIM")
            await a.execute(["INSERT INTO kv (k) VALUES ('not across')"])
            a_addr, b_addr = format_addr(a.swim.address), format_addr(b.swim.address)

            def warned(peer: str, dialed: bool) -> list[logging.LogRecord]:
                return [
                    r
                    for r in caplog.records
                    if r.name == "corrosion.members"
                    and r.levelno == logging.WARNING
                    and getattr(r, "fields", {}).get("dialed") is dialed
                    and getattr(r, "fields", {}).get("peer") == peer
                ]

            await wait_for(
                lambda: bool(warned(b_addr, True) and warned(a_addr, True)),
                what="a and b to warn about the TLS handshakes they dialed",
            )
            for record in warned(b_addr, True) + warned(a_addr, True):
                assert "certificate verify failed" in record.getMessage()
                assert "gossip.tls.ca_file" in record.getMessage()
            assert a.events.peer_tls_failures > 0 and b.events.peer_tls_failures > 0
            assert await rows(b, "SELECT k FROM kv") == []
            # throttled: the first line per peer and reason, then a count per interval
            assert len(warned(b_addr, True)) <= 2


async def test_mutual_tls_refuses_peers_without_a_client_certificate(tmp_path, caplog):
    """a and b hold the cluster's certificate; c trusts the cluster (so it can connect) but
    has a certificate of its own and offers no client certificate: a and b refuse the streams
    c opens, and do not trust c as a server, so nothing of c's reaches them."""
    cert, key = self_signed_cert(tmp_path / "cluster")
    own_cert, own_key = self_signed_cert(tmp_path / "outsider")
    server = {"cert_file": str(cert), "key_file": str(key), "ca_file": str(cert)}
    # plaintext SWIM (no key), so that c can join the membership and TLS alone must keep it out
    clear = {"plaintext": True, "encryption_keys": []}
    mutual = {**clear, "tls": {**server, "client": {"cert_file": str(cert),
                                                    "key_file": str(key)}}}  # fmt: skip
    one_way = {**clear, "tls": {
        "cert_file": str(own_cert), "key_file": str(own_key), "ca_file": str(cert)}}  # fmt: skip
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip=mutual)) as a:
        cfg_b = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, gossip=mutual)
        cfg_c = agent_config(tmp_path, "c", [seed_addr(a)], with_api=False, gossip=one_way)
        async with Agent(cfg_b) as b, Agent(cfg_c) as c:
            await wait_for(lambda: c.alive_members() == 2, what="c to join SWIM (not TLS)")
            await a.execute(["INSERT INTO kv (k) VALUES ('mutual')"])
            await c.execute(["INSERT INTO kv (k) VALUES ('from c')"])

            async def b_has_a() -> bool:
                return await rows(b, "SELECT k FROM kv") == [("mutual",)]

            await wait_for(b_has_a, what="a's write to reach b over mutual TLS")
            # c offers no client certificate: a and b refuse every stream c opens (its pushes
            # and its syncs), so its write never reaches them. (a and b may still push to c:
            # c's server does not ask them for a certificate.)
            await wait_for(
                lambda: a.events.peer_stream_errors > 0 and b.events.peer_stream_errors > 0,
                what="c's handshakes to be refused by a and b",
            )
            for x in (a, b):
                assert await rows(x, "SELECT k FROM kv WHERE k = 'from c'") == []
                assert not x.store.bookie.holds(c.actor_id, 1)
            # the servers say why, at WARNING, and what to do
            refused = [
                r.getMessage()
                for r in caplog.records
                if r.name == "corrosion.members" and getattr(r, "fields", {}).get("dialed") is False
            ]
            assert refused and all("gossip.tls.client" in m for m in refused), refused


def test_mutual_tls_needs_a_ca_file(tmp_path):
    from corrosion.config import ConfigError

    cert, key = self_signed_cert(tmp_path)
    tls = {"cert_file": str(cert), "key_file": str(key),
           "client": {"cert_file": str(cert), "key_file": str(key)}}  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"gossip.tls.client: mutual TLS needs gossip.tls.ca_file"
    ):
        agent_config(tmp_path, "a", gossip={"plaintext": False, "tls": tls})
    with pytest.raises(ConfigError, match=r"gossip.tls.client.key_file"):
        agent_config(tmp_path, "b", gossip={"plaintext": False, "tls": {
            **tls, "ca_file": str(cert), "client": {"cert_file": str(cert)}}})  # fmt: skip


async def test_a_peer_that_hangs_up_during_the_handshake_costs_a_stream_not_the_node(tmp_path):
    """A peer restarting (or an outsider) may close a broadcast connection in the middle of the
    key handshake; the sender counts a lost stream and goes on with the next frame."""
    import anyio

    async def hang_up(stream: anyio.abc.SocketStream) -> None:
        await stream.receive()  # the preamble (and perhaps the nonce): a clean FIN, not a reset
        await stream.aclose()

    async with Agent(agent_config(tmp_path, "a")) as agent:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hang_up)
            send, receive = anyio.create_memory_object_stream[bytes](4)
            done = anyio.Event()
            before = agent.events.peer_stream_errors
            async with anyio.create_task_group() as senders:
                senders.start_soon(agent.peers.sender, ("127.0.0.1", port), receive, done)
                async with send:
                    await send.send(b"frame one")
                    await send.send(b"frame two")
            assert done.is_set()
            assert agent.events.peer_stream_errors == before + 2
            tg.cancel_scope.cancel()
