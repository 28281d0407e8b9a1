"""Peer streams: length-prefixed frames over TCP, optionally sealed with the gossip keyring
(AES-256-GCM, the cluster label as associated data) and/or wrapped in TLS.

Two kinds of stream open with a hello frame (cluster id, actor id, purpose): ``bcast`` streams
carry broadcast frames one way and stay open for reuse; ``sync`` streams carry one sync request
and its answer.

They connect to the gossip port, where SWIM's runtime also takes its push/pull streams: a client
first sends ``PEER_PREAMBLE`` (before TLS, if any), which the runtime routes to the agent.
"""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSStream

from swim import Keyring

_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
PEER_PREAMBLE = b"\xffCRP"  # see swim.SwimNode.route_streams


class FrameStreamError(Exception):
    """The peer sent something that is not a valid frame (too large, or not decryptable)."""


class FrameStream:
    def __init__(self, stream: ByteStream, keyring: Keyring | None, aad: bytes) -> None:
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._keyring = keyring
        self._aad = aad
        self.bytes_out = 0
        self.bytes_in = 0

    async def send(self, data: bytes) -> None:
        if self._keyring is not None:
            data = self._keyring.seal(data, self._aad)
        frame = _LEN.pack(len(data)) + data
        self.bytes_out += len(frame)
        await self.stream.send(frame)

    async def receive(self) -> bytes:
        (n,) = _LEN.unpack(await self._reader.receive_exactly(4))
        if n > MAX_FRAME:
            raise FrameStreamError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        data = await self._reader.receive_exactly(n)
        self.bytes_in += 4 + n
        if self._keyring is not None:
            opened = self._keyring.open(data, self._aad)
            if opened is None:
                raise FrameStreamError("frame could not be decrypted with any installed key")
            data = opened
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


def server_ssl_context(
    cert: Path, key: Path, ca: Path | None, *, require_client_cert: bool = False
) -> ssl.SSLContext:
    """With ``require_client_cert`` (mutual TLS), a peer without a certificate signed by
    ``ca`` fails the handshake."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(str(ca))
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(
    ca: Path | None,
    insecure: bool,
    *,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        ctx.load_verify_locations(str(ca))
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return ctx


async def connect(
    host: str,
    port: int,
    *,
    keyring: Keyring | None,
    aad: bytes,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> FrameStream:
    with anyio.fail_after(timeout):
        raw = await anyio.connect_tcp(host, port)
        try:
            await raw.send(PEER_PREAMBLE)
            stream: ByteStream = raw
            if ssl_context is not None:
                stream = await TLSStream.wrap(
                    raw, hostname=host, ssl_context=ssl_context, standard_compatible=False
                )
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise
    return FrameStream(stream, keyring, aad)
