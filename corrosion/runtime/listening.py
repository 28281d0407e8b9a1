"""Binding a configured address, with a failure that names the config key and the remedy.

The agent and its servers wrap each listener they bind in ``listening(key, addr)``, so a port in
use says which key chose it, in one line.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

from ..addresses import Address, format_addr
from ..errors import CorrosionError


class ListenError(CorrosionError, OSError):
    """A configured address could not be bound; the message names the key and the remedy."""


_LISTEN_REMEDIES: dict[int | None, str] = {
    errno.EADDRINUSE: "another process listens there: stop it or choose another port",
    errno.EADDRNOTAVAIL: "no local interface has that address: use one of this host's addresses",
    errno.EACCES: "ports below 1024 need privileges: choose a port above 1023",
}


@contextlib.contextmanager
def listening(key: str, addr: Address) -> Iterator[None]:
    """Turn an OSError raised while binding ``addr`` into a ``ListenError`` naming ``key``."""
    try:
        yield
    except ListenError:
        raise
    except socket.gaierror as exc:
        message = (
            f"{key}: cannot resolve the host of {format_addr(addr)}: {exc.strerror or exc}; "
            "use an IP address or a host name this machine resolves"
        )
        raise ListenError(exc.errno, message) from None
    except OSError as exc:
        code = _errno(exc)
        reason = (
            "address already in use" if code == errno.EADDRINUSE else (exc.strerror or str(exc))
        )
        remedy = _LISTEN_REMEDIES.get(code, f"check {key}")
        message = f"{key}: cannot listen on {format_addr(addr)}: {reason}; {remedy}"
        raise ListenError(code, message) from None


def _errno(exc: OSError) -> int | None:
    if exc.errno is not None:
        return exc.errno
    # some event loops drop the errno (uvloop: "could not bind to local_addr ...")
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return _errno(cause)
    return errno.EADDRINUSE if "bind" in str(exc) else None
