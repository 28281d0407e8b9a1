"""Machines as the API sees them: states, config validation, the machine document, leases.

The *document* is a JSON object stored in the machine's own database (``MachineLog.write_doc``)
and cached in memory by the service. Its public view is Fly's Machine shape (id, name, state,
region, instance_id, private_ip, config, image_ref, events, checks, created_at, updated_at);
internal fields (lease nonce, boot id, restart count) stay out of it.

Config validation is strict: an unknown key, a wrong type or an impossible value is a 400 with
the path of the offending field, and nothing is created or changed.
"""

from __future__ import annotations

import copy
import datetime as _dt
import re
import signal as _signal
from collections.abc import Mapping
from typing import Any

from .checks import validate_checks, validate_service_checks
from .drivers.base import InstanceSpec, parse_signal
from .durations import parse_duration
from .errors import InvalidRequestError
from .volumes import validate_mounts

# --- states -------------------------------------------------------------------------------------

CREATED = "created"
STARTING = "starting"
STARTED = "started"
STOPPING = "stopping"
STOPPED = "stopped"
RESTARTING = "restarting"
UPDATING = "updating"
DESTROYING = "destroying"
DESTROYED = "destroyed"
FAILED = "failed"
SUSPENDED = "suspended"

PERSISTENT = frozenset({CREATED, STARTED, STOPPED, FAILED, DESTROYED})
WAITABLE = frozenset({CREATED, STARTED, STOPPED, SUSPENDED, DESTROYED, FAILED})

# which states each user operation may start from (checked against the *projected* state: the
# outcome of the operations already accepted for the machine)
ALLOWED_FROM: dict[str, frozenset[str]] = {
    "start": frozenset({CREATED, STOPPED, FAILED}),
    "stop": frozenset({STARTED}),
    "restart": frozenset({STARTED}),
    "update": frozenset({CREATED, STARTED, STOPPED, FAILED}),
    "destroy": frozenset({CREATED, STARTED, STOPPED, FAILED}),
    "cordon": frozenset({CREATED, STARTED, STOPPED, FAILED}),
    "uncordon": frozenset({CREATED, STARTED, STOPPED, FAILED}),
}

RESTART_POLICIES = ("no", "always", "on-failure")
DEFAULT_MAX_RETRIES = 10
DEFAULT_STOP_TIMEOUT = 10.0
MAX_EVENTS = 20

# --- config validation --------------------------------------------------------------------------

# fields the orchestrator acts on, and Fly fields it accepts and keeps without acting on them
_KNOWN = {
    "image", "init", "env", "restart", "guest", "stop_config", "metadata", "auto_destroy", "mounts",
}  # fmt: skip
_PASSTHROUGH = {
    "services", "checks", "dns", "processes", "files", "schedule", "statics",
    "standbys", "size", "metrics", "disable_machine_autostart",
}  # fmt: skip


def _obj(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{field}: expected an object, got {type(value).__name__}")
    return dict(value)


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"{field}: expected a list of strings")
    return list(value)


def _str_map(value: Any, field: str, *, key_re: re.Pattern | None = None) -> dict[str, str]:
    d = _obj(value, field)
    for k, v in d.items():
        if not isinstance(v, str):
            raise InvalidRequestError(f"{field}.{k}: expected a string value")
        if key_re is not None and not key_re.match(k):
            raise InvalidRequestError(f"{field}: invalid key {k!r}")
    return d


_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")


def _positive_int(value: Any, field: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise InvalidRequestError(f"{field}: expected an integer from 1 to {maximum}")
    return value


def validate_config(raw: Any) -> dict[str, Any]:
    """A normalized copy of a machine config, or InvalidRequestError naming the bad field."""
    cfg = _obj(raw, "config")
    unknown = sorted(set(cfg) - _KNOWN - _PASSTHROUGH)
    if unknown:
        raise InvalidRequestError(f"config: unknown field(s) {', '.join(unknown)}")
    image = cfg.get("image")
    if not isinstance(image, str) or not image.strip():
        raise InvalidRequestError("config.image: required (a non-empty string)")
    out: dict[str, Any] = {k: copy.deepcopy(v) for k, v in cfg.items() if k in _PASSTHROUGH}
    services = cfg.get("services")
    if services is not None:
        if not isinstance(services, list) or not all(isinstance(x, Mapping) for x in services):
            raise InvalidRequestError("config.services: expected a list of objects")
        for i, svc in enumerate(services):
            port = svc.get("internal_port")
            if port is not None and (
                isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
            ):
                raise InvalidRequestError(f"config.services[{i}].internal_port: expected 1-65535")
        for svc, checks in zip(out["services"], validate_service_checks(services), strict=True):
            if checks:
                svc["checks"] = checks
    out["image"] = image.strip()
    init = _obj(cfg.get("init") or {}, "config.init")
    bad = sorted(set(init) - {"exec", "entrypoint", "cmd", "tty", "swap_size_mb"})
    if bad:
        raise InvalidRequestError(f"config.init: unknown field(s) {', '.join(bad)}")
    out["init"] = {
        k: _strings(init[k], f"config.init.{k}")
        for k in ("exec", "entrypoint", "cmd")
        if init.get(k) is not None
    }
    out["env"] = _str_map(cfg.get("env") or {}, "config.env", key_re=_ENV_KEY)
    restart = _obj(cfg.get("restart") or {}, "config.restart")
    bad = sorted(set(restart) - {"policy", "max_retries"})
    if bad:
        raise InvalidRequestError(f"config.restart: unknown field(s) {', '.join(bad)}")
    policy = restart.get("policy", "on-failure")
    if policy == "on-fail":
        policy = "on-failure"
    if policy not in RESTART_POLICIES:
        raise InvalidRequestError(
            f"config.restart.policy: {policy!r} is not one of {', '.join(RESTART_POLICIES)}"
        )
    retries = restart.get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 1000:
        raise InvalidRequestError("config.restart.max_retries: expected an integer from 0 to 1000")
    out["restart"] = {"policy": policy, "max_retries": retries}
    guest = _obj(cfg.get("guest") or {}, "config.guest")
    bad = sorted(set(guest) - {"cpus", "memory_mb", "cpu_kind", "kernel_args"})
    if bad:
        raise InvalidRequestError(f"config.guest: unknown field(s) {', '.join(bad)}")
    out["guest"] = {
        "cpus": _positive_int(guest.get("cpus", 1), "config.guest.cpus", 64),
        "memory_mb": _positive_int(guest.get("memory_mb", 256), "config.guest.memory_mb", 262144),
        "cpu_kind": str(guest.get("cpu_kind", "shared")),
    }
    stop = _obj(cfg.get("stop_config") or {}, "config.stop_config")
    bad = sorted(set(stop) - {"signal", "timeout"})
    if bad:
        raise InvalidRequestError(f"config.stop_config: unknown field(s) {', '.join(bad)}")
    try:
        sig = parse_signal(stop.get("signal"))
    except ValueError as e:
        raise InvalidRequestError(f"config.stop_config.signal: {e}") from None
    timeout = parse_duration(
        stop.get("timeout", DEFAULT_STOP_TIMEOUT), "config.stop_config.timeout"
    )
    out["stop_config"] = {"signal": _signal.Signals(sig).name, "timeout": timeout}
    out["metadata"] = _str_map(cfg.get("metadata") or {}, "config.metadata", key_re=METADATA_KEY)
    auto = cfg.get("auto_destroy", False)
    if not isinstance(auto, bool):
        raise InvalidRequestError("config.auto_destroy: expected true or false")
    out["auto_destroy"] = auto
    if cfg.get("checks") is not None:  # passed through above; acted on, so validated here
        out["checks"] = validate_checks(cfg["checks"], services)
    if cfg.get("mounts") is not None:
        out["mounts"] = validate_mounts(cfg["mounts"])
    return out


def command(config: Mapping[str, Any]) -> tuple[str, ...]:
    """``init.exec`` wins; otherwise entrypoint + cmd; empty means the image's default."""
    init = config.get("init") or {}
    if init.get("exec"):
        return tuple(init["exec"])
    return tuple(init.get("entrypoint") or ()) + tuple(init.get("cmd") or ())


def cmd_only(config: Mapping[str, Any]) -> bool:
    """Whether the command is ``init.cmd`` alone, which keeps the image's entrypoint."""
    init = config.get("init") or {}
    return bool(init.get("cmd")) and not init.get("exec") and not init.get("entrypoint")


def instance_spec(doc: Mapping[str, Any]) -> InstanceSpec:
    cfg = doc["config"]
    return InstanceSpec(
        instance_id=doc["instance_id"],
        machine_id=doc["id"],
        image=cfg["image"],
        cmd=command(cfg),
        cmd_only=cmd_only(cfg),
        env=dict(cfg.get("env") or {}),
        memory_mb=cfg.get("guest", {}).get("memory_mb"),
        cpus=cfg.get("guest", {}).get("cpus"),
    )


def image_ref(image: str) -> dict[str, Any]:
    name, _, digest = image.partition("@")
    repo, tag = name, "latest"
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = name.rsplit(":", 1)
    first = repo.split("/", 1)[0] if "/" in repo else ""
    registry = first if "." in first or ":" in first or first == "localhost" else ""
    return {"registry": registry, "repository": repo, "tag": tag, "digest": digest}


def iso(ts: float) -> str:
    return (
        _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )  # fmt: skip


# --- the document -------------------------------------------------------------------------------


def new_doc(
    *,
    machine_id: str,
    app: str,
    name: str,
    region: str,
    worker: str,
    instance_id: str,
    config: dict[str, Any],
    now: float,
    skip_service_registration: bool = False,
) -> dict[str, Any]:
    return {
        "id": machine_id,
        "name": name,
        "app": app,
        "region": region,
        "worker": worker,
        "state": CREATED,
        "instance_id": instance_id,
        "private_ip": "",
        "config": config,
        "created_at": now,
        "updated_at": now,
        "events": [],
        "checks": [],
        "cordoned": False,
        "skip_service_registration": skip_service_registration,
        "lease": None,
        "restarts": 0,
        "boot": None,
        "last_exit": None,
    }


def add_event(
    doc: dict[str, Any], kind: str, status: str, *, now: float, source: str = "flyd", **request: Any
) -> None:
    event = {"type": kind, "status": status, "source": source, "timestamp": int(now * 1000)}
    if request:
        event["request"] = request
    doc["events"] = [event, *doc.get("events", [])][:MAX_EVENTS]


def public_view(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Fly's Machine JSON."""
    return {
        "id": doc["id"],
        "name": doc["name"],
        "state": doc["state"],
        "region": doc["region"],
        "instance_id": doc["instance_id"],
        "version": doc["instance_id"],
        "private_ip": doc.get("private_ip", ""),
        "config": copy.deepcopy(doc["config"]),
        "image_ref": image_ref(doc["config"]["image"]),
        "created_at": iso(doc["created_at"]),
        "updated_at": iso(doc["updated_at"]),
        "events": copy.deepcopy(doc.get("events", [])),
        "checks": copy.deepcopy(doc.get("checks", [])),
        "host_status": "ok",
        "cordoned": bool(doc.get("cordoned")),
    }


# --- leases -------------------------------------------------------------------------------------


def active_lease(doc: Mapping[str, Any], now: float) -> dict[str, Any] | None:
    lease = doc.get("lease")
    if lease and lease.get("expires_at", 0) > now:
        return lease
    return None


def lease_view(lease: Mapping[str, Any], *, with_nonce: bool) -> dict[str, Any]:
    data = {
        "owner": lease["owner"],
        "description": lease.get("description", ""),
        "expires_at": int(lease["expires_at"]),
        "version": lease["version"],
    }
    if with_nonce:
        data["nonce"] = lease["nonce"]
    return {"status": "success", "data": data}
