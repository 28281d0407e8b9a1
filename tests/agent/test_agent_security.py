"""Cluster ids keep clusters apart; encrypted gossip and peer streams work with the right key and
keep out nodes with another one; TLS on the peer streams."""

from __future__ import annotations

import base64
import datetime
import os

import anyio
import pytest
from agent_helpers import agent_config, rows, seed_addr, wait_for

from corrosion import Agent

pytestmark = pytest.mark.anyio

KEY_A = base64.b64encode(b"A" * 32).decode()
KEY_B = base64.b64encode(b"B" * 32).decode()


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_other_cluster_never_joins_or_replicates(tmp_path):
    async with Agent(agent_config(tmp_path, "a", with_api=False, gossip={"cluster_id": 1})) as a:
        cfg = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False, gossip={"cluster_id": 2})
        async with Agent(cfg) as b:
            await a.execute(["INSERT INTO kv (k) VALUES ('from a')"])
            await anyio.sleep(2.0)  # give gossip and sync every chance to (wrongly) cross
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
            await anyio.sleep(1.0)
            assert c.alive_members() == 0
            assert await rows(c, "SELECT count(*) FROM kv") == [(0,)]
            assert a.swim.stats.malformed > 0  # c's packets were dropped and counted


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corrosion test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


async def test_tls_peer_streams(tmp_path):
    cert, key = _self_signed(tmp_path)
    tls = {
        "plaintext": False,
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
