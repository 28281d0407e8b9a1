"""Start-up failures an operator can fix, said in one line: the cause and what to do.

``check_addresses`` binds every fixed port before the database is touched; ``explain`` turns the
expected failures (a port in use, a database held by another agent or not writable, a schema the
database cannot take, an admin socket in use) into that line. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import TYPE_CHECKING

import apsw

from crdt.errors import CrdtError

from ..config import ConfigError
from ..runtime.dblock import DatabaseInUse
from ..runtime.listening import ListenError, listening

if TYPE_CHECKING:
    from ..config import Config


def check_addresses(cfg: Config) -> None:
    """Resolve every configured address and bind (and release) every fixed port, so that a
    host that does not resolve or a port in use fails start-up before the database is touched
    (``ListenError``). Binding port 0 is left to the agent."""
    checks = [("gossip.addr", cfg.gossip.addr, socket.SOCK_DGRAM)]
    checks.append(("gossip.addr", cfg.gossip.addr, socket.SOCK_STREAM))
    checks += [("api.addr", a, socket.SOCK_STREAM) for a in cfg.api.addrs]
    checks += [("api.pg.addr", a, socket.SOCK_STREAM) for a in cfg.api.pg_addrs]
    if cfg.prometheus_addr is not None:
        checks.append(("telemetry.prometheus.addr", cfg.prometheus_addr, socket.SOCK_STREAM))
    for key, (host, port), kind in checks:
        with listening(key, (host, port)):
            if port == 0:
                socket.getaddrinfo(host, port, type=kind)
            else:
                bind_probe(host, port, kind)


def bind_probe(host: str, port: int, kind: socket.SocketKind) -> None:
    """Bind ``host:port`` and release it, as the agent's listener of ``kind`` would bind it
    (``OSError`` when it cannot: taken, or a host that does not resolve). A check, not a
    claim: the listener binds it a moment later."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=kind)[0]
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:  # as the listeners do: TIME_WAIT is no conflict
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(sockaddr)


def explain(exc: BaseException, cfg: Config) -> str | None:
    """The one line for an expected start-up failure, or None for anything else (a bug)."""
    db = str(cfg.db.path)
    if isinstance(exc, ListenError):
        return exc.strerror
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, DatabaseInUse):
        return f"{exc}: stop that agent first, or give this one another db.path"
    if isinstance(exc, PermissionError):
        where = exc.filename or db
        return (
            f"permission denied on {where}: the agent needs to create and write files in the "
            f"directory of db.path ({db}); fix its owner/mode or run as a user that can"
        )
    if isinstance(exc, apsw.ReadOnlyError | apsw.CantOpenError | apsw.PermissionsError):
        return (
            f"database {db} cannot be opened for writing ({exc}): the agent needs write access "
            "to the file and to its directory (for the WAL files)"
        )
    if isinstance(exc, apsw.NotADBError | apsw.CorruptError):
        return f"database {db} is not a usable SQLite database ({exc}): check db.path"
    if isinstance(exc, apsw.BusyError | apsw.LockedError):
        return (
            f"database {db} is locked by another process ({exc}): close whatever holds it "
            "(a sqlite3 shell in a write transaction?) and start again"
        )
    if isinstance(exc, CrdtError):
        return f"schema (db.schema_paths) cannot be applied: {exc}"
    if isinstance(exc, ValueError) and str(exc).startswith("admin.path"):
        if "another agent" in str(exc):
            return f"{exc}: stop that agent first, or set another admin.path"
        return f"{exc}: move it away, or set another admin.path"
    if isinstance(exc, FileNotFoundError):
        return f"{exc.strerror or exc}: {exc.filename}: check the paths in the config"
    if isinstance(exc, ssl.SSLError):
        return f"gossip.tls: {exc}: check the certificate and key files"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.ENOTDIR):
        return f"{exc}: check db.path ({db})"
    return None
