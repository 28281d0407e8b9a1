"""The admin socket's client half: what the ``corrosion`` command and scripts need to talk to a
running agent (``admin_request``, ``agent_listening``), kept apart from the server
(``admin``) so that a client command does not load the agent to send one line.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import CorrosionError

DEFAULT_PATH = Path("/var/run/corrosion/admin.sock")
MAX_LINE = 1 << 20  # bytes per request (line or frame)
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with the terminating NUL


class AdminError(CorrosionError):
    """The agent answered a command with an error."""


class AdminUnavailable(CorrosionError, OSError):
    """No agent answers on the admin socket; ``str()`` is the message alone (no errno)."""

    def __str__(self) -> str:
        return str(self.strerror)


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
