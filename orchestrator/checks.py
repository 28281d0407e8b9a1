"""Health checks as a machine config declares them (``config.checks``), and how one is probed.

A check is Fly's ``MachineCheck``: ``{"type": "tcp" | "http", "port", "interval", "timeout",
"grace_period", "kind"}`` plus, for http, ``method``, ``path``, ``protocol`` (http or https),
``tls_skip_verify``, ``tls_server_name`` and ``headers`` (``[{"name", "values": [...]}]``).
Durations are Go-style strings (``"10s"``) or seconds; the normalized config stores seconds. A
TCP check passes when the port accepts a connection, an HTTP check when it answers 2xx; anything
else is ``critical`` (``warning`` means not run yet). :mod:`.health` runs them.

``kind`` is Fly's: a ``readiness`` check that is critical takes the machine out of the proxy's
rotation, an ``informational`` one does not. Unlike Fly, where top-level checks default to
informational, here they default to readiness (so a machine with only top-level checks is routed
by them, as this orchestrator's users had it before service checks existed).

Service-level checks (``config.services[i].checks``, Fly's ``MachineServiceCheck``: the same
fields without a name or ``kind``) always steer routing. They run beside the top-level ones under
Fly's generated names, ``servicecheck-NN-<type>-<port>`` (NN counts them across all services),
and take their service's ``internal_port`` when they name no port.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from .durations import parse_duration
from .errors import InvalidRequestError

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
READINESS, INFORMATIONAL = "readiness", "informational"
TYPES = ("tcp", "http")
KINDS = (READINESS, INFORMATIONAL)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_INTERVAL = 15.0
DEFAULT_TIMEOUT = 2.0
MIN_INTERVAL = 0.1
MAX_CHECKS = 32

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_COMMON = {"type", "port", "interval", "timeout", "grace_period", "kind"}
_HTTP_ONLY = {"method", "path", "protocol", "tls_skip_verify", "tls_server_name", "headers"}


# --- validation ---------------------------------------------------------------------------------


def validate_checks(raw: Any, services: Any = None) -> dict[str, dict[str, Any]]:
    """The normalized ``config.checks``, or InvalidRequestError naming the bad field. A check
    without ``port`` uses the first service's ``internal_port``."""
    if not isinstance(raw, Mapping):
        raise InvalidRequestError("config.checks: expected an object of name -> check")
    if len(raw) > MAX_CHECKS:
        raise InvalidRequestError(f"config.checks: at most {MAX_CHECKS} checks")
    default_port = None
    if isinstance(services, list) and services and isinstance(services[0], Mapping):
        default_port = services[0].get("internal_port")
    return {name: _validate_check(name, check, default_port) for name, check in sorted(raw.items())}


def validate_service_checks(services: list[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each service's normalized ``checks`` list (empty where it has none), or
    InvalidRequestError naming the bad field as ``config.services[i].checks[j]``."""
    out: list[list[dict[str, Any]]] = []
    count = 0
    for i, svc in enumerate(services):
        raw = svc.get("checks")
        if raw is None:
            out.append([])
            continue
        if not isinstance(raw, list):
            raise InvalidRequestError(f"config.services[{i}].checks: expected a list of checks")
        normalized = []
        for j, check in enumerate(raw):
            where = f"config.services[{i}].checks[{j}]"
            if isinstance(check, Mapping) and "kind" in check:
                raise InvalidRequestError(
                    f"{where}.kind: service checks always steer routing; use config.checks "
                    "for an informational check"
                )
            no_port = isinstance(check, Mapping) and check.get("port") is None
            if no_port and svc.get("internal_port") is None:
                raise InvalidRequestError(
                    f"{where}.port: required (config.services[{i}] has no internal_port)"
                )
            out_check = _validate_check(None, check, svc.get("internal_port"), where)
            del out_check["kind"]  # not a field of a service check (a client may send GET back)
            normalized.append(out_check)
            count += 1
        out.append(normalized)
    if count > MAX_CHECKS:
        raise InvalidRequestError(f"config.services: at most {MAX_CHECKS} service checks")
    return out


def service_check_names(config: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(Fly's generated name, check) for every service-level check, in order."""
    checks = [c for svc in config.get("services") or [] for c in svc.get("checks") or []]
    return [(f"servicecheck-{n:02d}-{c['type']}-{c['port']}", c) for n, c in enumerate(checks)]


def _validate_check(
    name: Any, raw: Any, default_port: Any, where: str | None = None
) -> dict[str, Any]:
    if where is None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"config.checks: invalid check name {name!r}")
        where = f"config.checks.{name}"
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(f"{where}: expected an object")
    unknown = sorted(set(raw) - _COMMON - _HTTP_ONLY)
    if unknown:
        raise InvalidRequestError(f"{where}: unknown field(s) {', '.join(unknown)}")
    check_type = raw.get("type")
    if check_type not in TYPES:
        raise InvalidRequestError(f"{where}.type: required, one of {', '.join(TYPES)}")
    port = raw.get("port", default_port)
    if port is None:
        raise InvalidRequestError(f"{where}.port: required (no service to take it from)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidRequestError(f"{where}.port: expected an integer from 1 to 65535")
    interval = parse_duration(raw.get("interval", DEFAULT_INTERVAL), f"{where}.interval")
    if interval < MIN_INTERVAL:
        raise InvalidRequestError(f"{where}.interval: at least {MIN_INTERVAL * 1000:g}ms")
    timeout = parse_duration(raw.get("timeout", DEFAULT_TIMEOUT), f"{where}.timeout")
    if timeout <= 0:
        raise InvalidRequestError(f"{where}.timeout: must be more than 0")
    grace = parse_duration(raw.get("grace_period", 0), f"{where}.grace_period")
    check_kind = raw.get("kind", READINESS)
    if check_kind not in KINDS:
        raise InvalidRequestError(f"{where}.kind: one of {', '.join(KINDS)}")
    out: dict[str, Any] = {
        "type": check_type, "port": port, "interval": interval, "timeout": timeout,
        "grace_period": grace, "kind": check_kind,
    }  # fmt: skip
    if check_type == "tcp":
        extra = sorted(set(raw) & _HTTP_ONLY)
        if extra:
            raise InvalidRequestError(f"{where}.{extra[0]}: only for http checks")
        return out
    method = raw.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise InvalidRequestError(f"{where}.method: one of {', '.join(METHODS)}")
    path = raw.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n"):
        raise InvalidRequestError(f"{where}.path: expected a path starting with '/'")
    protocol = raw.get("protocol", "http")
    if protocol not in ("http", "https"):
        raise InvalidRequestError(f"{where}.protocol: one of http, https")
    skip_verify = raw.get("tls_skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise InvalidRequestError(f"{where}.tls_skip_verify: expected true or false")
    out.update(method=method.upper(), path=path, protocol=protocol, tls_skip_verify=skip_verify,
               headers=_headers(raw.get("headers", []), f"{where}.headers"))  # fmt: skip
    server_name = raw.get("tls_server_name")
    if server_name is not None:
        if not isinstance(server_name, str) or not server_name:
            raise InvalidRequestError(f"{where}.tls_server_name: expected a host name")
        out["tls_server_name"] = server_name
    return out


def _headers(raw: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise InvalidRequestError(f'{where}: expected a list of {{"name", "values"}}')
    out = []
    for i, h in enumerate(raw):
        if not isinstance(h, Mapping) or set(h) - {"name", "values"}:
            raise InvalidRequestError(f'{where}[{i}]: expected {{"name", "values"}}')
        name, values = h.get("name"), h.get("values", [])
        if not isinstance(name, str) or not _HEADER.match(name):
            raise InvalidRequestError(f"{where}[{i}].name: invalid header name {name!r}")
        if not isinstance(values, list) or not all(
            isinstance(v, str) and "\r" not in v and "\n" not in v for v in values
        ):
            raise InvalidRequestError(f"{where}[{i}].values: expected a list of strings")
        out.append({"name": name, "values": list(values)})
    return out


# --- probing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSpec:
    """One validated check, as the runner uses it."""

    name: str
    type: str
    port: int
    interval: float
    timeout: float
    grace_period: float
    kind: str = READINESS
    method: str = "GET"
    path: str = "/"
    protocol: str = "http"
    tls_skip_verify: bool = False
    tls_server_name: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, name: str, check: Mapping[str, Any]) -> CheckSpec:
        """From a check as :func:`validate_checks` normalized it."""
        fields = {k: v for k, v in check.items() if k in cls.__dataclass_fields__}
        fields["headers"] = tuple(
            (h["name"], v) for h in check.get("headers") or () for v in h["values"]
        )
        return cls(name=name, **fields)


Probe = Callable[[str, CheckSpec], Awaitable[tuple[str, str]]]


def _reason(error: BaseException) -> str:
    """The first non-empty message down an exception's chain (some transports wrap the TLS or
    socket error in an exception without text)."""
    seen: BaseException | None = error
    while seen is not None:
        if str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return "failed"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NetworkProbe:
    """Real probes: a TCP connect, or an HTTP request on a fresh connection (no keep-alive, so
    a server that stopped accepting is noticed). Timeouts are the runner's (the clock's)."""

    def __init__(self) -> None:
        self._clients: dict[bool, httpx.AsyncClient] = {}

    async def __call__(self, host: str, spec: CheckSpec) -> tuple[str, str]:
        if spec.type == "tcp":
            target = _hostport(host, spec.port)
            try:
                stream = await anyio.connect_tcp(host, spec.port)
            except OSError as e:
                return CRITICAL, f"TCP connect {target}: {e.strerror or e}"
            await stream.aclose()
            return PASSING, f"TCP connect {target}: success"
        return await self._http(host, spec)

    async def _http(self, host: str, spec: CheckSpec) -> tuple[str, str]:
        url = f"{spec.protocol}://{_hostport(host, spec.port)}{spec.path}"
        verify = not spec.tls_skip_verify
        client = self._clients.get(verify)
        if client is None:
            client = self._clients[verify] = httpx.AsyncClient(
                verify=verify, timeout=None, follow_redirects=False,
                limits=httpx.Limits(max_keepalive_connections=0),
            )  # fmt: skip
        extensions = {"sni_hostname": spec.tls_server_name} if spec.tls_server_name else {}
        what = f"HTTP {spec.method} {url}"
        try:
            request = client.build_request(
                spec.method, url, headers=list(spec.headers), extensions=extensions
            )
            response = await client.send(request)
        except httpx.HTTPError as e:
            return CRITICAL, f"{what}: {type(e).__name__}: {_reason(e)}"
        status = PASSING if 200 <= response.status_code < 300 else CRITICAL
        return status, f"{what}: {response.status_code} {response.reason_phrase}".rstrip()

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


def specs(config: Mapping[str, Any]) -> list[CheckSpec]:
    """The checks a started machine runs: its top-level checks by name, then its service checks."""
    top = [CheckSpec.from_config(n, c) for n, c in sorted((config.get("checks") or {}).items())]
    services = [
        CheckSpec.from_config(n, {**c, "kind": READINESS}) for n, c in service_check_names(config)
    ]
    return top + services


def published_checks(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The results as the replicated row carries them: Fly's fields plus each check's ``kind``,
    which a proxy needs to know whether a critical result takes the machine out of rotation."""
    config = doc.get("config", {}).get("checks") or {}
    return [
        {**c, "kind": config.get(c.get("name"), {}).get("kind", READINESS)}
        for c in doc.get("checks") or []
    ]


__all__ = [
    "CRITICAL",
    "PASSING",
    "WARNING",
    "CheckSpec",
    "NetworkProbe",
    "Probe",
    "published_checks",
    "service_check_names",
    "specs",
    "validate_checks",
    "validate_service_checks",
]
