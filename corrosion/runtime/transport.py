"""Peer streams: length-prefixed frames over TCP, optionally sealed with the gossip keyring
(AES-256-GCM) and/or wrapped in TLS.

With a keyring, both ends first send each other 16 random bytes (``NONCE_SIZE``), then seal
every frame with associated data binding it to this stream: the cluster label, both nonces, the
direction and the frame's index. Without the key nothing can be written (an outsider's hello
fails to open and the stream ends); a recorded stream cannot be replayed (the other end's nonce
differs), and frames cannot be reordered, dropped, reflected or spliced from another stream.

Two kinds of stream open with a hello frame (cluster id, actor id, purpose): ``bcast`` streams
carry broadcast frames one way and stay open for reuse; ``sync`` streams carry one sync request
and its answer.

They connect to the gossip port, where SWIM's runtime also takes its push/pull streams: a client
first sends ``PEER_PREAMBLE`` (before TLS, if any), which the runtime routes to the agent.
"""

from __future__ import annotations

import os
import ssl
import struct
from pathlib import Path

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSStream

from swim import Keyring

from ..errors import CorrosionError

_LEN = struct.Struct(">I")
_INDEX = struct.Struct(">Q")
NONCE_SIZE = 16
MAX_FRAME = 64 * 1024 * 1024
PEER_PREAMBLE = b"\xffCRP"  # see swim.SwimNode.route_streams


class FrameStreamError(CorrosionError):
    """The peer sent something that is not a valid frame (too large, or not decryptable)."""


class UnauthenticatedFrame(FrameStreamError):
    """A frame that no installed key authenticates for this stream: not from a cluster member
    (or replayed, reordered or spliced)."""


# What a peer stream raises when the peer goes away, misbehaves or is too slow: the stream is
# lost, the node is not. Every place that talks to a peer catches these (and only these).
PEER_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.IncompleteRead,
    FrameStreamError,
    TimeoutError,
)


class FrameStream:
    def __init__(self, stream: ByteStream, keyring: Keyring | None, aad: bytes) -> None:
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._keyring = keyring
        self._aad = aad
        self._send_aad = self._recv_aad = aad
        self._sent = self._received = 0
        self.bytes_out = 0
        self.bytes_in = 0

    async def handshake(self, *, client: bool) -> None:
        """With a keyring: exchange nonces, so that every frame is bound to this stream (see
        the module docstring). Both ends send first, so this costs one round trip."""
        if self._keyring is None:
            return
        mine = os.urandom(NONCE_SIZE)
        await self.stream.send(mine)
        theirs = await self._reader.receive_exactly(NONCE_SIZE)
        self.bytes_out += NONCE_SIZE
        self.bytes_in += NONCE_SIZE
        base = self._aad + b"/" + (mine + theirs if client else theirs + mine)
        to_server, to_client = base + b"/c>s/", base + b"/s>c/"
        self._send_aad, self._recv_aad = (
            (to_server, to_client) if client else (to_client, to_server)
        )

    async def send(self, data: bytes) -> None:
        if self._keyring is not None:
            data = self._keyring.seal(data, self._send_aad + _INDEX.pack(self._sent))
            self._sent += 1
        frame = _LEN.pack(len(data)) + data
        self.bytes_out += len(frame)
        await self.stream.send(frame)

    @property
    def authenticated(self) -> bool:
        """A frame has been opened with the keyring: the other end holds the cluster's key."""
        return self._keyring is not None and self._received > 0

    async def receive(self, *, max_size: int = MAX_FRAME) -> bytes:
        (n,) = _LEN.unpack(await self._reader.receive_exactly(4))
        if n > max_size:
            raise FrameStreamError(f"frame of {n} bytes exceeds {max_size}")
        data = await self._reader.receive_exactly(n)
        self.bytes_in += 4 + n
        if self._keyring is not None:
            opened = self._keyring.open(data, self._recv_aad + _INDEX.pack(self._received))
            if opened is None:
                raise UnauthenticatedFrame("frame not authenticated by any installed key")
            data = opened
        self._received += 1
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
            framed = FrameStream(stream, keyring, aad)
            await framed.handshake(client=True)
        except BaseException:
            await anyio.aclose_forcefully(raw)
            raise
    return framed
