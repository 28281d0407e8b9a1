"""The admin socket: operator commands for a running agent over a Unix socket, JSON lines.

Why a socket and not the HTTP API: it is reachable only by local users with file permissions on
the path (no token to leak), it answers while the API is disabled or firewalled, and a client
that can connect knows an agent owns the database (``corrosion restore`` relies on this).

Protocol: the client sends one JSON object per line and reads one JSON object per line back, in
order; a connection may carry any number of requests.

    → {"cmd": "ping"}                                   ← {"ok": true, "result": "pong"}
    → {"cmd": "reload", "allow_destructive": false}     ← {"ok": true, "result": {"applied": [...],
                                                           "not_in_schema", "pending_schema"}}
    → {"cmd": "sync generate"}                          ← {"ok": true, "result": {sync state}}
    → {"cmd": "cluster members"}                        ← {"ok": true, "result": [members]}
    → {"cmd": "health"}                                 ← {"ok": true, "result": {...}}
    → {"cmd": "log set", "filter": "debug"}             ← {"ok": true, "result": {"filter": ...}}
    → {"cmd": "log reset"}                              ← {"ok": true, "result": {"filter": ...}}
    → anything else                                     ← {"ok": false, "error": "..."}

Bad input (invalid JSON, unknown command, wrong argument types) gets an error reply and the
connection stays usable; a line longer than ``MAX_LINE`` gets an error reply and the connection is
closed. Nothing a client sends can stop the agent.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskGroup

from crdt.errors import CrdtError

from ..config import ConfigError
from ..errors import CorrosionError
from ..logs import parse_levels, reset_levels, set_levels
from .interfaces import AdminAgent
from .serving import serve_listener

DEFAULT_PATH = Path("/var/run/corrosion/admin.sock")
MAX_LINE = 1 << 20  # bytes per request line
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with the terminating NUL
COMMANDS = ("ping", "reload", "sync generate", "cluster members", "health", "log set", "log reset")
ARGS = {"reload": {"allow_destructive"}, "log set": {"filter"}}

log = logging.getLogger("corrosion.admin")


class AdminError(CorrosionError):
    """The agent answered a command with an error."""


class AdminUnavailable(CorrosionError, OSError):
    """No agent answers on the admin socket; ``str()`` is the message alone (no errno)."""

    def __str__(self) -> str:
        return str(self.strerror)


# -- server ------------------------------------------------------------------------------------


class _BadRequest(CorrosionError):
    pass


async def start_admin(
    agent: AdminAgent, tg: TaskGroup, path: str | os.PathLike[str]
) -> Callable[[], Awaitable[None]]:
    """Listen on ``path`` inside ``tg``; return the closer (stops serving, removes the file).

    A stale socket file (left by a killed agent) is replaced; a live one (another agent answers
    on it) or a non-socket file at the path is an error, so two agents never share a socket."""
    path = Path(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"admin.path: {str(path)!r} is longer than {MAX_SOCKET_PATH} bytes")
    await anyio.to_thread.run_sync(_clear_stale, path)
    listener = await anyio.create_unix_listener(path)
    stop = await serve_listener(tg, listener, lambda stream: _serve_conn(agent, stream))

    async def close() -> None:
        await stop()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    return close


def _clear_stale(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"admin.path: {str(path)!r} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody listens: left over by a dead agent
            return
    raise ValueError(f"admin.path: another agent is listening on {str(path)!r}")


async def _serve_conn(agent: AdminAgent, stream: ByteStream) -> None:
    buf = bytearray()
    async with stream:
        try:
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_LINE:
                        await stream.send(_reply_error(f"request longer than {MAX_LINE} bytes"))
                        return
                    chunk = await stream.receive(65536)
                    buf += chunk
                    continue
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if not line.strip():
                    continue
                await stream.send(await _answer(agent, line))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return


def _reply_error(message: str) -> bytes:
    return (json.dumps({"ok": False, "error": message}) + "\n").encode()


async def _answer(agent: AdminAgent, line: bytes) -> bytes:
    try:
        request = _parse(line)
        result = await _run(agent, request)
    except (_BadRequest, CrdtError, ConfigError) as exc:  # the operator's to fix: said plainly
        return _reply_error(str(exc))
    except Exception as exc:  # noqa: BLE001 — a failing command must not take the socket down
        return _reply_error(f"{type(exc).__name__}: {exc}")
    try:
        return (json.dumps({"ok": True, "result": result}) + "\n").encode()
    except (TypeError, ValueError) as exc:
        return _reply_error(f"result is not JSON-serialisable: {exc}")


def _parse(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _BadRequest('request must be a JSON object like {"cmd": "ping"}')
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise _BadRequest('request needs a "cmd" string')
    if cmd not in COMMANDS:
        raise _BadRequest(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
    allowed = {"cmd"} | ARGS.get(cmd, set())
    extra = sorted(set(request) - allowed)
    if extra:
        raise _BadRequest(f"unknown argument {extra[0]!r} for {cmd!r}")
    if not isinstance(request.get("allow_destructive", False), bool):
        raise _BadRequest("allow_destructive must be true or false")
    if cmd == "log set":
        try:
            parse_levels(request.get("filter"))
        except ValueError as exc:
            raise _BadRequest(f"filter: {exc}") from None
    return request


async def _run(agent: AdminAgent, request: dict[str, Any]) -> Any:
    cmd = request["cmd"]
    log.debug("admin command %r", cmd)
    if cmd == "ping":
        return "pong"
    if cmd == "reload":
        try:
            applied = await agent.reload_schema(
                allow_destructive=request.get("allow_destructive", False)
            )
        except Exception as exc:
            log.warning("schema reload refused: %s", exc)
            raise
        return {
            "applied": list(applied),
            "not_in_schema": list(agent.not_in_schema),
            "pending_schema": agent.pending_schema.to_json(),
        }
    if cmd == "log set":
        spec: str | None = set_levels(request["filter"])
        log.info("log level filter set to %r (admin socket)", spec)
        return {"filter": spec}
    if cmd == "log reset":
        spec = reset_levels()
        log.info("log level filter reset to %r (admin socket)", spec)
        return {"filter": spec}
    if cmd == "sync generate":
        return agent.sync_state()
    if cmd == "cluster members":
        return [m.to_json() for m in agent.members()]
    assert cmd == "health"
    return {
        "actor_id": agent.actor_id.hex(),
        "gaps": agent.gaps(),
        "members": agent.alive_members(),
        "p99_lag": agent.p99_lag(),
        "queue_size": agent.queue_size(),
        "pending_schema": agent.pending_schema.to_json(),
        "not_in_schema": list(agent.not_in_schema),
    }


# -- client ------------------------------------------------------------------------------------


def admin_request(
    path: str | os.PathLike[str], cmd: str, *, timeout: float = 60.0, **args: Any
) -> Any:
    """Send one command and return its result (blocking; for the CLI and scripts).

    Raises ``AdminUnavailable`` when nothing listens at ``path`` and ``AdminError`` with the
    agent's message when the command failed."""
    request = (json.dumps({"cmd": cmd, **args}) + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                reason += " (is the agent running?)"  # no socket, or one left by a dead agent
            where = os.path.abspath(path)
            raise AdminUnavailable(
                exc.errno, f"no agent answers on the admin socket {where!r}: {reason}"
            ) from None
        sock.sendall(request)
        buf = bytearray()
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AdminError("the agent closed the admin connection without answering")
            buf += chunk
    reply = json.loads(buf[: buf.index(b"\n")])
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error", "unknown error")))
    return reply.get("result")


def agent_listening(path: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    """True when something accepts connections on the admin socket at ``path`` (an agent that
    is running, even if too busy to answer a ping)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except TimeoutError:
            return True  # a listener whose backlog is full is still a live agent
        except OSError:
            return False
    return True
