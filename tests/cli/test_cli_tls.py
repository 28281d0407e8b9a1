"""``corrosion tls ca|server|client generate``: certificates that two real agents use for
mutual TLS on their peer streams, and clear errors for bad input."""

from __future__ import annotations

import stat

import pytest
from cli_helpers import cli, cluster, rows
from support import wait_for

pytestmark = pytest.mark.anyio


async def generate(*args: str) -> str:
    result = await cli("tls", *args)
    assert result.exit_code == 0, result.output
    return result.output


async def test_generated_certificates_carry_mutual_tls_between_agents(base):
    pki = base / "pki"
    nodes = [pki / "n0", pki / "n1"]  # made by the commands, as a user expects
    await generate("ca", "generate", "--output-dir", str(pki))
    ca = ["--ca-key", str(pki / "ca_key.pem"), "--ca-cert", str(pki / "ca_cert.pem")]
    for d in nodes:
        await generate("server", "generate", "127.0.0.1", *ca, "--output-dir", str(d))
        await generate("client", "generate", *ca, "--output-dir", str(d))
    keys = [d / f"{kind}_key.pem" for d in nodes for kind in ("server", "client")]
    for path in [pki / "ca_key.pem", *keys]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    # both nodes listen on 127.0.0.1: one node's files serve for both in the cluster helper
    d = nodes[0]
    tls = {
        "cert_file": str(d / "server_cert.pem"),
        "key_file": str(d / "server_key.pem"),
        "ca_file": str(pki / "ca_cert.pem"),
        "client": {"cert_file": str(d / "client_cert.pem"), "key_file": str(d / "client_key.pem")},
    }
    async with cluster(base, 2, gossip={"tls": tls}) as (a, b):
        await a.execute(["INSERT INTO todos (id, title) VALUES (1, 'over mutual tls')"])

        async def arrived() -> bool:
            return await rows(b, "SELECT title FROM todos") == [("over mutual tls",)]

        await wait_for(arrived, what="the write to cross the generated certificates")
        assert a.events.peer_stream_errors == 0 and b.events.peer_stream_errors == 0


async def test_bad_input_is_refused_and_nothing_overwritten(base):
    await generate("ca", "generate", "--output-dir", str(base))
    key_before = (base / "ca_key.pem").read_bytes()
    again = await cli("tls", "ca", "generate", "--output-dir", str(base))
    assert again.exit_code == 1 and "ca_cert.pem exists" in again.output
    assert (base / "ca_key.pem").read_bytes() == key_before
    (base / "a-file").write_text("")
    not_dir = await cli("tls", "ca", "generate", "--output-dir", str(base / "a-file"))
    assert not_dir.exit_code == 1 and "is not a directory" in not_dir.output

    ca = ["--ca-key", str(base / "ca_key.pem"), "--ca-cert", str(base / "ca_cert.pem")]
    out = base / "out"
    out.mkdir()
    bad_ip = await cli("tls", "server", "generate", "10.0.0", *ca, "--output-dir", str(out))
    assert bad_ip.exit_code == 1 and "'10.0.0' is not an IP address" in bad_ip.output
    await generate("client", "generate", *ca, "--output-dir", str(out))
    wrong_key = [
        "--ca-key", str(out / "client_key.pem"), "--ca-cert", str(base / "ca_cert.pem"),
    ]  # fmt: skip
    other = base / "other"
    other.mkdir()
    result = await cli("tls", "client", "generate", *wrong_key, "--output-dir", str(other))
    assert result.exit_code == 1 and "--ca-key does not belong to --ca-cert" in result.output
    not_ca = ["--ca-key", str(out / "client_key.pem"), "--ca-cert", str(out / "client_cert.pem")]
    result = await cli("tls", "client", "generate", *not_ca, "--output-dir", str(other))
    assert result.exit_code == 1 and "not a CA certificate" in result.output
    missing = await cli("tls", "client", "generate", "--ca-key", "nope", "--ca-cert", "nope")
    assert missing.exit_code == 1 and "No such file" in missing.output
    assert list(other.iterdir()) == []
