"""The admin socket: operator commands for a running agent over a Unix socket.

Why a socket and not the HTTP API: it is reachable only by local users with file permissions on
the path (no token to leak), it answers while the API is disabled or firewalled, and a client
that can connect knows an agent owns the database (``corrosion restore`` relies on this).

It speaks two framings, told apart by a connection's first byte (a NUL byte, the first of a
length below 16 MiB: corrosion's; anything else: ours):

**JSON lines** (ours, what ``corrosion`` commands use): the client sends one JSON object per
line and reads one JSON object per line back, in order; a connection may carry any number.

    → {"cmd": "ping"}                                   ← {"ok": true, "result": "pong"}
    → {"cmd": "reload", "allow_destructive": false}     ← {"ok": true, "result": {"applied": [...],
                                                           "not_in_schema", "pending_schema"}}
    → {"cmd": "schema apply", "sql": "CREATE TABLE ...", "allow_destructive": false, "wait": 10}
                                                        ← {"ok": true, "result": {"version", ...}}
    → {"cmd": "schema show"}                            ← {"ok": true, "result": {"status",
                                                           "schema"}}
    → {"cmd": "sync generate"}                          ← {"ok": true, "result": {sync state}}
    → {"cmd": "sync reconcile-gaps"}                    ← {"ok": true, "result": {"actors",
                                                           "reconciled": [...]}}
    → {"cmd": "cluster members"}                        ← {"ok": true, "result": [members]}
    → {"cmd": "cluster membership-states"}              ← {"ok": true, "result": [states]}
    → {"cmd": "cluster rejoin"}                         ← {"ok": true, "result": {"asked",
                                                           "answered"}}
    → {"cmd": "actor version", "actor_id": "<hex or uuid>", "version": 3}
                                                        ← {"ok": true, "result": {"current":...}}
    → {"cmd": "subs list"}                              ← {"ok": true, "result": [subs]}
    → {"cmd": "subs info", "hash": "..."} (or "id")     ← {"ok": true, "result": {...}}
    → {"cmd": "health"}                                 ← {"ok": true, "result": {...}}
    → {"cmd": "log set", "filter": "debug"}             ← {"ok": true, "result": {"filter": ...}}
    → {"cmd": "log reset"}                              ← {"ok": true, "result": {"filter": ...}}
    → {"cmd": "plumtree stats"}                         ← {"ok": true, "result": {counters, trees}}
    → {"cmd": "profile", "seconds": 10, "out": "/abs/agent.prof"}
                                                        ← {"ok": true, "result": {"path", ...}}
    → anything else                                     ← {"ok": false, "error": "..."}

**corrosion's** (``corro-admin``), so corrosion's own ``corrosion`` binary can administer this
agent: frames of a 4-byte big-endian length then that many bytes of JSON (tokio's
``LengthDelimitedCodec``), each request a serde-encoded ``Command`` (``"Ping"``,
``{"Sync": "Generate"}``, ``{"Subs": {"Info": {"hash": null, "id": "<uuid>"}}}``,
``{"Actor": {"Version": {"actor_id": "<uuid>", "version": 3}}}``, ...), answered by a stream
of ``{"Log": {"level", "msg", "ts"}}`` and ``{"Json": value}`` frames ended by ``"Success"`` or
``{"Error": {"msg": "..."}}``. corrosion's commands that have no meaning here (``ReloadDicts``,
``Cluster SetId``, ``Sync CheckBookieConsistency/ProcessBufferedChanges``) are
answered with an ``Error`` that says so.

Bad input (invalid JSON, unknown command, wrong argument types) gets an error reply and the
connection stays usable; a request longer than ``MAX_LINE`` gets an error reply and the
connection is closed. Nothing a client sends can stop the agent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskGroup

from crdt.errors import CrdtError

from ..config import ConfigError
from ..core.cluster_schema import ProposalRefused
from ..errors import CorrosionError
from ..logs import parse_levels, reset_levels, set_levels
from ..runtime import maintenance
from ..runtime.maintenance import MaintenanceError
from ..runtime.schema_flow import SchemaConflict
from .admin_client import (
    MAX_LINE,
    MAX_SOCKET_PATH,
)
from .interfaces import AdminAgent
from .profiling import ProfileError, check_request, profile
from .schema_api import check_proposal, schema_show
from .serving import serve_listener

COMMANDS = (
    "ping",
    "reload",
    "schema apply",
    "schema show",
    "sync generate",
    "sync reconcile-gaps",
    "cluster members",
    "cluster membership-states",
    "cluster rejoin",
    "actor version",
    "subs list",
    "subs info",
    "health",
    "log set",
    "log reset",
    "profile",
    "plumtree stats",
)
ARGS = {
    "reload": {"allow_destructive"},
    "schema apply": {"sql", "allow_destructive", "wait"},
    "log set": {"filter"},
    "actor version": {"actor_id", "version"},
    "subs info": {"hash", "id"},
    "profile": {"seconds", "out"},
}

log = logging.getLogger("corrosion.admin")


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
            while not buf:
                buf += await stream.receive(65536)
            if buf[0] == 0:  # a length prefix: corrosion's framing (requests are < 16 MiB)
                await _serve_frames(agent, stream, buf)
            else:
                await _serve_lines(agent, stream, buf)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return


async def _serve_lines(agent: AdminAgent, stream: ByteStream, buf: bytearray) -> None:
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > MAX_LINE:
                await stream.send(_reply_error(f"request longer than {MAX_LINE} bytes"))
                return
            buf += await stream.receive(65536)
            continue
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if not line.strip():
            continue
        await stream.send(await _answer(agent, line))


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
    return _checked(request)


def _checked(request: Any) -> dict[str, Any]:
    """A request of ours, its arguments checked (and the actor id decoded)."""
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
    if cmd == "actor version":
        actor, version = request.get("actor_id"), request.get("version")
        if not isinstance(actor, str):
            raise _BadRequest('"actor_id" must be the actor\'s id (a UUID or 32 hex digits)')
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _BadRequest('"version" must be an integer >= 1')
        try:
            request["actor_id"] = maintenance.parse_actor_id(actor)
        except MaintenanceError as exc:
            raise _BadRequest(str(exc)) from None
    if cmd == "profile":
        try:
            check_request(request.get("seconds"), request.get("out"))
        except ProfileError as exc:
            raise _BadRequest(str(exc)) from None
    if cmd == "subs info":
        hash_, sid = request.get("hash"), request.get("id")
        if not isinstance(hash_, str | None) or not isinstance(sid, str | None):
            raise _BadRequest('"hash" and "id" must be strings')
        if sid is not None:
            try:
                request["id"] = str(uuid.UUID(sid))
            except ValueError:
                raise _BadRequest(f"id {sid!r} is not a subscription id (a UUID)") from None
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
    if cmd == "schema apply":
        return await _schema_apply(agent, request)
    if cmd == "schema show":
        return schema_show(agent.schema.status)
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
    if cmd == "profile":
        seconds, out = check_request(request["seconds"], request["out"])
        log.info("profiling the agent for %gs into %s (admin socket)", seconds, out)
        try:
            return await profile(seconds, out)
        except ProfileError as exc:
            raise _BadRequest(str(exc)) from None
    if cmd == "cluster members":
        return [m.to_json() for m in agent.members()]
    if cmd == "plumtree stats":
        tree = agent.replicator.plumtree if agent.replicator is not None else None
        if tree is None:
            raise _BadRequest('plumtree is not in use here (gossip.broadcast = "fanout")')
        return tree.snapshot()
    if cmd in _PARTS_COMMANDS:
        try:
            return await _PARTS_COMMANDS[cmd](agent, request)
        except MaintenanceError as exc:
            raise _BadRequest(str(exc)) from None
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


async def _schema_apply(agent: AdminAgent, request: dict[str, Any]) -> Any:
    try:
        args = {k: v for k, v in request.items() if k not in ("cmd", "sql")}
        sql, allow, wait = check_proposal({**args, "schema": request.get("sql")})
    except ValueError as exc:
        raise _BadRequest(str(exc).replace('"schema"', '"sql"')) from None
    try:
        return await agent.schema.propose(sql, allow_destructive=allow, wait=wait)
    except (ProposalRefused, SchemaConflict) as exc:
        log.warning("schema proposal refused: %s", exc)
        raise _BadRequest(str(exc)) from None


async def _rejoin(agent: AdminAgent, request: dict[str, Any]) -> Any:
    assert agent.swim is not None
    result = await maintenance.rejoin(agent.swim, agent.config.gossip.bootstrap)
    log.info("rejoined the cluster through %d members (admin socket)", result["answered"])
    return result


async def _membership_states(agent: AdminAgent, request: dict[str, Any]) -> Any:
    assert agent.swim is not None
    return maintenance.membership_states(agent.swim)


async def _reconcile_gaps(agent: AdminAgent, request: dict[str, Any]) -> Any:
    assert agent.store is not None
    result = await maintenance.reconcile_gaps(agent.store, agent.db_lock)
    for done in result["reconciled"]:
        log.info("gaps of %s reconciled (admin socket)", done["actor_id"])
    return result


async def _actor_version(agent: AdminAgent, request: dict[str, Any]) -> Any:
    assert agent.store is not None
    return await maintenance.actor_version(
        agent.store, agent.db_lock, request["actor_id"], request["version"]
    )


async def _subs_list(agent: AdminAgent, request: dict[str, Any]) -> Any:
    return maintenance.subs_list(agent.subscriptions)


async def _subs_info(agent: AdminAgent, request: dict[str, Any]) -> Any:
    return maintenance.sub_info(
        agent.subscriptions, hash_=request.get("hash"), sid=request.get("id")
    )


_PARTS_COMMANDS: dict[str, Callable[[AdminAgent, dict[str, Any]], Awaitable[Any]]] = {
    "cluster rejoin": _rejoin,
    "cluster membership-states": _membership_states,
    "sync reconcile-gaps": _reconcile_gaps,
    "actor version": _actor_version,
    "subs list": _subs_list,
    "subs info": _subs_info,
}


# -- corrosion's framing -----------------------------------------------------------------------


async def _serve_frames(agent: AdminAgent, stream: ByteStream, buf: bytearray) -> None:
    """corrosion's admin protocol: length-delimited JSON frames (see the module docstring)."""
    while True:
        while len(buf) < 4:
            buf += await stream.receive(65536)
        size = int.from_bytes(buf[:4], "big")
        if size > MAX_LINE:
            await stream.send(_frame(_corro_error(f"request longer than {MAX_LINE} bytes")))
            return
        while len(buf) < 4 + size:
            buf += await stream.receive(65536)
        payload = bytes(buf[4 : 4 + size])
        del buf[: 4 + size]
        for response in await _answer_corrosion(agent, payload):
            await stream.send(_frame(response))


def _frame(response: Any) -> bytes:
    data = json.dumps(response).encode()
    return len(data).to_bytes(4, "big") + data


def _corro_error(message: str) -> dict[str, Any]:
    return {"Error": {"msg": message}}


def _corro_log(message: str) -> dict[str, Any]:
    """A ``Response::Log``; ``ts`` is a ``time::OffsetDateTime`` in serde's tuple form (year,
    day of the year, hour, minute, second, nanosecond, offset h/m/s), which corrosion's client
    reads whether or not its ``time`` has the human-readable feature."""
    now = time.time()
    t = time.gmtime(now)
    nanos = int((now % 1) * 1e9)
    ts = [t.tm_year, t.tm_yday, t.tm_hour, t.tm_min, t.tm_sec, nanos, 0, 0, 0]
    return {"Log": {"level": "info", "msg": message, "ts": ts}}


# corrosion's Command variants: (enum, variant) → our command; None: not applicable here
_CORROSION_COMMANDS: dict[tuple[str, str | None], str | None] = {
    ("Ping", None): "ping",
    ("Reload", None): "reload",
    ("ReloadDicts", None): None,
    ("Sync", "Generate"): "sync generate",
    ("Sync", "ReconcileGaps"): "sync reconcile-gaps",
    ("Sync", "CheckBookieConsistency"): None,
    ("Sync", "ProcessBufferedChanges"): None,
    ("Cluster", "Rejoin"): "cluster rejoin",
    ("Cluster", "Members"): "cluster members",
    ("Cluster", "MembershipStates"): "cluster membership-states",
    ("Cluster", "SetId"): None,
    ("Actor", "Version"): "actor version",
    ("Subs", "List"): "subs list",
    ("Subs", "Info"): "subs info",
    ("Log", "Set"): "log set",
    ("Log", "Reset"): "log reset",
    ("Plumtree", "Stats"): "plumtree stats",
}


def _variant(value: Any) -> tuple[str, Any]:
    """serde's externally tagged enum: ``"Unit"``, or ``{"Variant": content}``."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and len(value) == 1:
        [(name, content)] = value.items()
        return name, content
    raise _BadRequest(f"not a corrosion admin command: {json.dumps(value)[:200]}")


def _from_corrosion(payload: bytes) -> dict[str, Any]:
    """Our request for one of corrosion's serde-encoded ``Command`` frames."""
    try:
        value = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"request is not valid JSON: {exc}") from None
    name, content = _variant(value)
    sub, args = (None, None)
    if name in ("Sync", "Cluster", "Actor", "Subs", "Log", "Plumtree"):
        sub, args = _variant(content)
    elif content is not None:
        raise _BadRequest(f"{name} takes no argument")
    if (name, sub) not in _CORROSION_COMMANDS:
        raise _BadRequest(f"unknown corrosion admin command {name}{' ' + sub if sub else ''}")
    cmd = _CORROSION_COMMANDS[(name, sub)]
    if cmd is None:
        what = f"{name} {sub}" if sub else name
        raise _BadRequest(f"{what} does not apply to this agent (corrosion-only command)")
    request: dict[str, Any] = {"cmd": cmd}
    if cmd in ARGS:
        if not isinstance(args, dict):
            raise _BadRequest(f"{name} {sub} needs its fields: {', '.join(sorted(ARGS[cmd]))}")
        request.update({k: v for k, v in args.items() if v is not None})
    elif args is not None:
        raise _BadRequest(f"{name} {sub} takes no argument")
    return request


async def _answer_corrosion(agent: AdminAgent, payload: bytes) -> list[Any]:
    """The response frames for one request, as corro-admin sends them."""
    try:
        request = _checked(_from_corrosion(payload))
        result = await _run(agent, request)
    except (_BadRequest, CrdtError, ConfigError) as exc:
        return [_corro_error(str(exc))]
    except Exception as exc:  # noqa: BLE001 — a failing command must not take the socket down
        return [_corro_error(f"{type(exc).__name__}: {exc}")]
    cmd = request["cmd"]
    frames: list[Any]
    if cmd == "ping":
        frames = []
    elif cmd == "reload":
        done = result["applied"] or ["schema unchanged"]
        frames = [_corro_log(line) for line in done]
    elif cmd in ("log set", "log reset"):
        frames = [_corro_log(f"log filter: {result['filter']}")]
    elif cmd == "cluster rejoin":
        frames = [_corro_log(f"rejoined the cluster: {result['answered']} members answered")]
    elif cmd == "sync reconcile-gaps":
        frames = [_corro_log(f"reconciling gaps for {result['actors']} actors...")]
        frames += [
            _corro_log(
                f"collapsed ranges for {r['actor_id']} (deleted: {r['deleted']}, "
                f"inserted: {r['inserted']})"
            )
            for r in result["reconciled"]
        ]
    elif cmd in ("cluster members", "cluster membership-states"):
        frames = [{"Json": item} for item in result]  # one frame per member, as corrosion
    else:
        frames = [{"Json": result}]
    return [*frames, "Success"]
