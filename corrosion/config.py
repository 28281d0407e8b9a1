"""Agent configuration: corrosion's TOML keys, validated at start-up.

```toml
[db]
path = "/var/lib/corrosion/state.db"      # required: the SQLite database
schema_paths = ["/etc/corrosion/schema"]  # .sql files or dirs of them (reload re-reads)
schema_source = "cluster"                 # "cluster": follow the cluster's schema versions
subscriptions_path = "/var/lib/corrosion/subs"  # default: <path>.subscriptions beside it
subscriptions_keep_changes = 500          # recent changes a subscription keeps for resuming
tombstone_gc = false                      # collect deleted rows' metadata once all members have it
tombstone_gc_interval = 60.0              # seconds between reaper passes
tombstone_gc_batch = 1000                 # deleted rows collected per pass, at most

[api]
addr = "127.0.0.1:8080"                   # HTTP API (one address or a list)
authz.bearer-token = "secret"             # optional: require "Authorization: Bearer secret"
query_timeout = 60.0                      # seconds a query may run (?timeout= overrides; 0: none)
transaction_timeout = 60.0                # seconds a transaction's statements may run
pg.addr = "127.0.0.1:5432"                # PostgreSQL protocol (also corrosion's [[api.pg]])
concurrency_limit = 128                   # requests each streaming route serves at once (503 above)
endpoint_name = "node-a"                  # 421 for requests meant for another endpoint name

[gossip]
addr = "0.0.0.0:8787"                     # SWIM (UDP) and peer streams (TCP)
external_addr = "10.0.0.5:8787"           # advertised address (default: addr)
bootstrap = ["10.0.0.6:8787"]             # seeds to join through
encryption_keys = ["<base64 32 bytes>"]   # required: AES-256-GCM keyring (`corrosion keygen`)
plaintext = false                         # true: run without keys (anyone can join and write)
cluster_id = 0                            # nodes of other clusters are ignored
preset = "lan"                            # SWIM timings: "lan" | "wan" | "local"
broadcast = "fanout"                      # or "plumtree" (cluster-wide): how changes spread
tls.cert_file = "..."                     # TLS for the peer (sync/broadcast) streams
tls.key_file = "..."
tls.ca_file = "..."
tls.insecure = false
tls.client.cert_file = "..."             # mutual TLS: present this, require peers' (ca_file)
tls.client.key_file = "..."

[perf]
min_sync_backoff = 1.0                    # seconds between sync rounds grows from this...
max_sync_backoff = 15.0                   # ...to this, with jitter
broadcast = true                          # false: converge through sync alone (testing)
apply_batch_size = 1000                   # changesets applied per transaction, at most

[admin]
path = "/var/run/corrosion/admin.sock"

[telemetry]
prometheus.addr = "127.0.0.1:9090"
open-telemetry.exporter.endpoint = "http://localhost:4318"  # traces to this OTLP/HTTP collector
# open-telemetry = "from-env"             # (instead) traces where OTEL_EXPORTER_OTLP_* say

[log]
level = "info"                            # or "debug", "info,corrosion.sync=debug", ...
format = "plaintext"                      # or "json"
colors = true
summary_interval = 10.0                   # seconds between sync summaries (none when idle)
```

docs/agent.md's "Configuration" lists every key with its type and default (a test keeps the
two in step). Relative paths in a file are relative to its directory (``Config.load``).
Unknown keys and wrong types fail with a message naming the key (``ConfigError``). Environment
variables override keys with ``__`` as the separator (``GOSSIP__ADDR``), as corrosion does;
``CORROSION_LOG`` overrides ``log.level`` (see ``corrosion.logs``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import ipaddress
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .addresses import Address, format_addr
from .errors import CorrosionError
from .logs import parse_levels

# corrosion's keys this agent does not use (yet), by table: a config written for corrosion is
# accepted, with one warning per key (``Config.ignored``), instead of refused; a key in neither
# corrosion's set nor ours is a typo and fails, naming the nearest valid key.
CORROSION_ONLY_KEYS: dict[str, frozenset[str]] = {
    table: frozenset(keys.split())
    for table, keys in {
        "": "consul reaper",
        "db": "cache_size_kib",
        "gossip": "client_addr max_mtu idle_timeout_secs disable_gso member_id compression",
        "perf": "apply_channel_len changes_channel_len empties_channel_len bcast_channel_len "
        "to_send_channel_len notifications_channel_len schedule_channel_len clearbuf_channel_len "
        "foca_channel_len processing_queue_len apply_queue_timeout apply_queue_min_batch_size "
        "apply_queue_step_base apply_queue_max_batch_size apply_queue_batch_threshold_ratio "
        "partial_retry_backoff wal_threshold_mb sql_tx_timeout",
    }.items()
}


class ConfigError(CorrosionError, ValueError):
    """The configuration is invalid; the message names the key."""


def parse_addr(value: Any, key: str) -> Address:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected a 'host:port' string, got {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port must be a number in {value!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{key}: port {p} in {value!r} is out of range (0 to 65535)")
    if not host:
        raise ConfigError(f"{key}: no host in {value!r} (e.g. '0.0.0.0:{p}' for every interface)")
    return host, p


def parse_bootstrap(value: Any, ignored: list[str]) -> tuple[Address, ...]:
    """``gossip.bootstrap``: corrosion's ``host:port@dns_ip[:port]`` form is accepted; the host
    is resolved with the system's resolver (the DNS server named is noted in ``ignored``)."""
    entries = [value] if isinstance(value, str) else value
    if isinstance(entries, list):
        plain = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str) and "@" in entry:
                entry, _, server = entry.partition("@")
                key = f"gossip.bootstrap[{i}]"
                parse_addr(server if ":" in server else f"{server}:53", f"{key} (DNS server)")
                ignored.append(f"{key}: the DNS server {server} (names resolve through the system)")
            plain.append(entry)
        value = plain
    return parse_addr_list(value, "gossip.bootstrap")


def parse_broadcast(value: Any, ignored: list[str]) -> str:
    """``gossip.broadcast``: ``"fanout"`` (default; corrosion calls it ``"gossip"``) or
    ``"plumtree"``; corrosion's table form ``[gossip.broadcast.plumtree]`` selects plumtree, and
    its tuning keys are noted in ``ignored`` (this agent's plumtree has its own defaults)."""
    if value is None:
        return GossipConfig.broadcast
    if isinstance(value, dict) and len(value) == 1:
        [(name, tuning)] = value.items()
        if isinstance(tuning, dict):
            for k in sorted(tuning):
                ignored.append(
                    f"gossip.broadcast.{name}.{k} (a corrosion setting this agent does not use)"
                )
            value = name
    mode = (
        {"fanout": "fanout", "gossip": "fanout", "plumtree": "plumtree"}.get(value)
        if isinstance(value, str)
        else None
    )
    if mode is None:
        raise ConfigError(f'gossip.broadcast: must be "fanout" or "plumtree", got {value!r}')
    return mode


def parse_addr_list(value: Any, key: str) -> tuple[Address, ...]:
    """One ``host:port`` string or a list of them (absent: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (parse_addr(value, key),)
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a 'host:port' string or a list of them, got {value!r}")
    return tuple(parse_addr(v, f"{key}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    insecure: bool = False
    # gossip.tls.client: this node's client certificate; with it, servers require one too
    # (mutual TLS, verified against ca_file), as corrosion does
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_cert_file is not None


@dataclass(frozen=True)
class DbConfig:
    path: Path
    schema_paths: tuple[Path, ...] = ()
    # where each subscription keeps its file (None: ``<db.path>.subscriptions`` beside the
    # database: corrosion's ``subscriptions`` beside it would be shared by every agent whose
    # database is in that directory, as the admin socket would), and how many of its recent
    # changes it keeps
    subscriptions_path: Path | None = None
    subscriptions_keep_changes: int = 500
    # "cluster": follow the replicated schema versions, reload proposes one; "files": each node
    # applies only its own files (corrosion's way), cluster versions are only compared
    schema_source: str = "cluster"
    # tombstone GC (corrosion.core.tombstones): off by default; passes and their size
    tombstone_gc: bool = False
    tombstone_gc_interval: float = 60.0
    tombstone_gc_batch: int = 1000

    def subscriptions_dir(self) -> Path:
        if self.subscriptions_path is not None:
            return self.subscriptions_path
        return self.path.with_name(self.path.name + ".subscriptions")


@dataclass(frozen=True)
class PgListener:
    """One ``[[api.pg]]`` listener: its address, and whether it refuses writes."""

    addr: Address
    readonly: bool = False


@dataclass(frozen=True)
class ApiConfig:
    addrs: tuple[Address, ...] = ()
    bearer_token: str | None = None
    # default time limits of a client's query and transaction, in seconds (0: none); see
    # docs/agent.md for why transactions have one too (they hold the node's only writer)
    query_timeout: float = 60.0
    transaction_timeout: float = 60.0
    # api.pg: where PostgreSQL clients connect (corrosion's [[api.pg]] tables too)
    pg: tuple[PgListener, ...] = ()
    # the requests each of /v1/transactions, /v1/queries, /v1/subscriptions and /v1/updates
    # serves at once (corrosion's 128); one more is answered 503 rather than queued
    concurrency_limit: int = 128
    # corrosion's api.endpoint_name: a request whose x-corrosion-requested-endpoint-name header
    # names another endpoint is answered 421 (it reached the wrong node through a proxy)
    endpoint_name: str | None = None

    @property
    def pg_addrs(self) -> tuple[Address, ...]:
        return tuple(listener.addr for listener in self.pg)


@dataclass(frozen=True)
class GossipConfig:
    addr: Address = ("127.0.0.1", 0)
    external_addr: Address | None = None
    bootstrap: tuple[Address, ...] = ()
    plaintext: bool = False
    encryption_keys: tuple[bytes, ...] = ()
    cluster_id: int = 0
    preset: str = "lan"
    tls: TlsConfig | None = None
    broadcast: str = "fanout"  # "fanout" or "plumtree" (replication.BROADCAST_MODES)


@dataclass(frozen=True)
class PerfConfig:
    min_sync_backoff: float = 1.0
    max_sync_backoff: float = 15.0
    broadcast: bool = True
    apply_batch_size: int = 1000


@dataclass(frozen=True)
class OpenTelemetryConfig:
    """``[telemetry] open-telemetry``: trace export is on; ``endpoint`` is corrosion's
    ``exporter.endpoint`` (an OTLP/HTTP collector), None for ``"from-env"`` (the ``OTEL_*``
    variables say where). corrosion.runtime.tracing resolves it with the environment."""

    endpoint: str | None = None


def parse_open_telemetry(value: Any, key: str) -> OpenTelemetryConfig | None:
    """corrosion's two shapes: ``"from-env"``, or ``{exporter = {endpoint = "<url>"}}``."""
    if value is None:
        return None
    if value == "from-env":
        return OpenTelemetryConfig()
    exporter = value.get("exporter") if isinstance(value, Mapping) else None
    if (
        isinstance(value, Mapping)
        and set(value) == {"exporter"}
        and isinstance(exporter, Mapping)
        and set(exporter) == {"endpoint"}
        and isinstance(exporter["endpoint"], str)
    ):
        endpoint = exporter["endpoint"]
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{key}.exporter.endpoint: expected the http:// or https:// URL of an OTLP/HTTP "
                f"collector (e.g. http://localhost:4318), got {endpoint!r}"
            )
        return OpenTelemetryConfig(endpoint)
    raise ConfigError(
        f'{key}: expected "from-env" (the OTEL_* environment says where traces go) or '
        f'exporter.endpoint = "<url of an OTLP/HTTP collector>", got {value!r}'
    )


@dataclass(frozen=True)
class Config:
    db: DbConfig
    api: ApiConfig = field(default_factory=ApiConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    admin_path: Path | None = None
    prometheus_addr: Address | None = None
    open_telemetry: OpenTelemetryConfig | None = None  # None: no traces (unless OTEL_* say)
    log_format: str = "plaintext"
    log_colors: bool = True
    log_level: str = "info"
    log_summary_interval: float = 10.0
    orchestrator: Mapping[str, Any] | None = None
    # the file this config was loaded from: ``corrosion reload`` re-reads db.schema_paths there
    source: Path | None = None
    # what the config says that this agent does not use (corrosion's settings it has no use
    # for), each a phrase the agent logs as a warning at start-up
    ignored: tuple[str, ...] = ()

    def admin_socket(self) -> Path:
        """``admin.path``, or by default ``<db.path>.admin.sock`` beside the database, so that
        every agent has its admin socket without root (corrosion's default lives under
        /var/run) and several agents on one machine never share one."""
        if self.admin_path is not None:
            return self.admin_path
        return self.db.path.with_name(self.db.path.name + ".admin.sock")

    @classmethod
    def load(cls, path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
        """Read a TOML file. Relative paths in it are relative to the file's directory (see
        ``resolve_paths``), so ``corrosion -c dir/config.toml`` works from anywhere; those given
        by environment variables stay relative to the current directory."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        source = Path(path).absolute()
        data = resolve_paths(data, source.parent)
        config = cls.from_mapping(apply_env(data, os.environ if env is None else env))
        return dataclasses.replace(config, source=source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Config:
        r = _Reader(data, "")
        db = r.table("db", DbConfig, required=True)
        api = r.table("api", ApiConfig)
        gossip = r.table("gossip", GossipConfig)
        perf = r.table("perf", PerfConfig)
        admin = r.table("admin")
        telemetry = r.table("telemetry")
        log = r.table("log", cls, prefix="log_")
        orchestrator = r.raw("orchestrator")
        r.done()

        db_cfg = DbConfig(
            path=Path(db.string("path")),
            schema_paths=tuple(Path(p) for p in db.string_list("schema_paths")),
            subscriptions_path=Path(p) if (p := db.opt_string("subscriptions_path")) else None,
            subscriptions_keep_changes=db.integer("subscriptions_keep_changes", lo=1, hi=10**9),
            schema_source=db.string("schema_source"),
            tombstone_gc=db.boolean("tombstone_gc"),
            tombstone_gc_interval=db.number("tombstone_gc_interval", lo=0.01),
            tombstone_gc_batch=db.integer("tombstone_gc_batch", lo=1, hi=1_000_000),
        )
        if db_cfg.schema_source not in ("cluster", "files"):
            raise ConfigError("db.schema_source: must be one of 'cluster', 'files'")
        db.done()

        api_addrs = parse_addr_list(api.alias("addr", "bind_addr"), "api.addr")
        authz = api.table("authz")
        token = authz.opt_string("bearer-token")
        if token is None:
            token = authz.opt_string("bearer")
        authz.done()
        timeouts = {k: api.number(k, lo=0.0) for k in ("query_timeout", "transaction_timeout")}
        pg = _pg_listeners(api.get("pg"))
        limit = api.integer("concurrency_limit", lo=1, hi=1_000_000)
        endpoint_name = api.opt_string("endpoint_name")
        api.done()
        api_cfg = ApiConfig(
            api_addrs,
            token,
            **timeouts,
            pg=pg,
            concurrency_limit=limit,
            endpoint_name=endpoint_name or None,
        )

        tls = gossip.table("tls", TlsConfig)
        tls_cfg = None
        if tls.data:
            client = tls.table("client", TlsConfig, prefix="client_")
            client_cert = client_key = None
            if client.data:
                client_cert = Path(client.string("cert_file"))
                client_key = Path(client.string("key_file"))
            client.done()
            tls_cfg = TlsConfig(
                cert_file=Path(tls.string("cert_file")),
                key_file=Path(tls.string("key_file")),
                ca_file=Path(p) if (p := tls.opt_string("ca_file")) else None,
                insecure=tls.boolean("insecure"),
                client_cert_file=client_cert,
                client_key_file=client_key,
            )
            if tls_cfg.mutual and tls_cfg.ca_file is None:
                raise ConfigError(
                    "gossip.tls.client: mutual TLS needs gossip.tls.ca_file to verify peers"
                )
        tls.done()
        keys = []
        for i, k in enumerate(gossip.string_list("encryption_keys")):
            try:
                raw = base64.b64decode(k, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    f"gossip.encryption_keys[{i}]: not valid base64 "
                    "('corrosion keygen' makes a key)"
                ) from None
            if len(raw) != 32:
                raise ConfigError(
                    f"gossip.encryption_keys[{i}]: must decode to 32 bytes (AES-256), "
                    f"got {len(raw)} ('corrosion keygen' makes a key)"
                )
            keys.append(raw)
        preset = gossip.string("preset")
        if preset not in ("lan", "wan", "local"):
            raise ConfigError("gossip.preset: must be one of 'lan', 'wan', 'local'")
        broadcast = parse_broadcast(gossip.get("broadcast"), r.ignored)
        addr = gossip.alias("addr", "bind_addr")
        ext = gossip.get("external_addr")
        plaintext = gossip.boolean("plaintext")
        gossip_cfg = GossipConfig(
            addr=parse_addr(addr, "gossip.addr") if addr else GossipConfig.addr,
            external_addr=parse_addr(ext, "gossip.external_addr") if ext else None,
            bootstrap=parse_bootstrap(gossip.get("bootstrap"), r.ignored),
            plaintext=plaintext,
            encryption_keys=tuple(keys),
            cluster_id=gossip.integer("cluster_id", lo=0, hi=65535),
            preset=preset,
            tls=tls_cfg,
            broadcast=broadcast,
        )
        gossip.done()

        perf_cfg = PerfConfig(
            min_sync_backoff=perf.number("min_sync_backoff", lo=0.01),
            max_sync_backoff=perf.number("max_sync_backoff", lo=0.01),
            broadcast=perf.boolean("broadcast"),
            apply_batch_size=perf.integer("apply_batch_size", lo=1, hi=1_000_000),
        )
        perf.done()
        if perf_cfg.max_sync_backoff < perf_cfg.min_sync_backoff:
            raise ConfigError("perf.max_sync_backoff: must be >= perf.min_sync_backoff")

        admin_path = admin.alias("path", "uds_path")
        if admin_path is not None and not isinstance(admin_path, str):
            raise ConfigError(f"admin.path: expected a string, got {type(admin_path).__name__}")
        admin.done()
        prom = telemetry.table("prometheus")
        prom_addr = prom.get("addr")
        prom.done()
        otel_key = "telemetry.open-telemetry"
        otel = parse_open_telemetry(telemetry.alias("open-telemetry", "open_telemetry"), otel_key)
        telemetry.done()
        log_format = log.string("format")
        if log_format not in ("plaintext", "json"):
            raise ConfigError("log.format: must be 'plaintext' or 'json'")
        colors = log.boolean("colors")
        log_level = log.string("level")
        try:
            parse_levels(log_level)
        except ValueError as exc:
            raise ConfigError(f"log.level: {exc}") from None
        summary_interval = log.number("summary_interval", lo=0.1)
        log.done()
        if orchestrator is not None:
            _check_orchestrator(orchestrator)
        return cls(
            db=db_cfg,
            api=api_cfg,
            gossip=gossip_cfg,
            perf=perf_cfg,
            admin_path=Path(admin_path) if admin_path else None,
            prometheus_addr=parse_addr(prom_addr, "telemetry.prometheus.addr")
            if prom_addr
            else None,
            open_telemetry=otel,
            log_format=log_format,
            log_colors=colors,
            log_level=log_level,
            log_summary_interval=summary_interval,
            orchestrator=orchestrator,
            ignored=tuple(r.ignored),
        )


def _pg_listeners(value: Any) -> tuple[PgListener, ...]:
    """``[api] pg.addr = "host:port"`` (or a list of them), or corrosion's ``[[api.pg]]``: a
    list of tables, each with its ``addr`` and optional ``readonly``."""
    if value is None:
        return ()
    tables = value if isinstance(value, list) else [value]
    listeners: list[PgListener] = []
    for i, table in enumerate(tables):
        key = "api.pg" if not isinstance(value, list) else f"api.pg[{i}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key}: expected a table with addr = 'host:port', got {table!r}")
        pg = _Reader(table, key + ".", _field_defaults(PgListener))
        addrs = parse_addr_list(pg.get("addr"), key + ".addr")
        if not addrs:
            raise ConfigError(f"{key}.addr: is required")
        readonly = pg.boolean("readonly")
        if pg.get("tls") is not None:
            raise ConfigError(
                f"{key}.tls: the PostgreSQL server has no TLS yet: serve it on loopback or a "
                "private network, or put a TLS proxy in front of it"
            )
        pg.done()
        listeners += [PgListener(addr, readonly) for addr in addrs]
    return tuple(listeners)


KEYGEN_HINT = "generate a key with `corrosion keygen`"


def gossip_security_error(gossip: GossipConfig) -> str | None:
    """Why this gossip config must not start, or None. Secure by default, as corrosion: without
    ``encryption_keys`` anything that reaches the gossip port could join and write rows, so
    running without them takes an explicit ``plaintext = true``. TLS alone is not enough here:
    it wraps the peer streams, but SWIM's UDP datagrams would still be unauthenticated.
    Checked when an agent starts (not at load, so client commands work with any config)."""
    if gossip.encryption_keys:
        if gossip.plaintext:
            return (
                "gossip.plaintext: true contradicts gossip.encryption_keys (keys encrypt all "
                "gossip); remove one of them"
            )
        return None
    if gossip.plaintext:
        return None
    if gossip.tls is not None:
        return (
            "gossip.encryption_keys: required (gossip.tls protects the peer streams, not SWIM's "
            f"UDP datagrams); {KEYGEN_HINT}, or set gossip.plaintext = true to accept "
            "unauthenticated membership"
        )
    return (
        "gossip.encryption_keys: required, or gossip.plaintext = true to let anything that "
        f"reaches the gossip port join and write; {KEYGEN_HINT}"
    )


def security_warnings(
    config: Config, gossip_addr: Address | None = None, api_addrs: Sequence[Address] = ()
) -> list[str]:
    """What an agent started with ``config`` leaves open, one line each (logged at start-up).
    ``gossip_addr`` and ``api_addrs``: the addresses as bound, when known (port 0 resolved)."""
    out = []
    g = config.gossip
    if g.plaintext:
        out.append(
            f"gossip.plaintext = true: gossip on {format_addr(gossip_addr or g.addr)} is not "
            "authenticated; anything that reaches it can join the cluster and write rows (set "
            "gossip.encryption_keys)"
        )
    exposed = [a for a in (api_addrs or config.api.addrs) if not _is_loopback(a[0])]
    if exposed and config.api.bearer_token is None:
        where = ", ".join(format_addr(a) for a in exposed)
        out.append(
            f"api.addr {where} is reachable beyond this machine and api.authz.bearer-token is "
            "not set: anyone who reaches it can read and write"
        )
    pg_exposed = [a for a in config.api.pg_addrs if not _is_loopback(a[0])]
    if pg_exposed and config.api.bearer_token is None:
        where = ", ".join(format_addr(a) for a in pg_exposed)
        out.append(
            f"api.pg.addr {where} is reachable beyond this machine and api.authz.bearer-token "
            "is not set: any PostgreSQL client that reaches it can read and write"
        )
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves beyond loopback


def generate_key() -> str:
    """A new gossip encryption key: 32 random bytes (AES-256), base64, for
    ``gossip.encryption_keys``."""
    return base64.b64encode(os.urandom(32)).decode()


def _check_orchestrator(section: Any) -> None:
    """``[orchestrator]`` is kept raw for the extension that serves it, which validates its
    keys (``corrosion.extensions``); here only its shape."""
    if not isinstance(section, Mapping):
        raise ConfigError("orchestrator: must be a table")


# the keys that name files or directories, by table; and in ``[orchestrator]`` every key that
# ends in ``_path`` (machines_path, archive_path, state_path, images_path)
PATH_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("db",): ("path", "schema_paths", "subscriptions_path"),
    ("admin",): ("path", "uds_path"),
    ("gossip", "tls"): ("cert_file", "key_file", "ca_file"),
    ("gossip", "tls", "client"): ("cert_file", "key_file"),
}


def resolve_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with its relative paths (strings under ``PATH_KEYS``) joined to ``base``, the
    config file's directory. Values of another type are left for ``from_mapping`` to refuse."""

    def join(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(base / value)
        if isinstance(value, list):
            return [join(v) for v in value]
        return value

    out = _copy_tables(data)
    tables = dict(PATH_KEYS)
    if isinstance(out.get("orchestrator"), dict):
        tables[("orchestrator",)] = tuple(k for k in out["orchestrator"] if k.endswith("_path"))
    for table, keys in tables.items():
        node: Any = out
        for name in table:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            for key in keys:
                if key in node:
                    node[key] = join(node[key])
    return out


def _copy_tables(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tables(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def apply_env(data: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``SECTION__KEY=value`` environment variables (lower-cased keys; values parsed as
    TOML scalars when they parse, else taken as strings)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    sections = {"db", "api", "gossip", "perf", "admin", "telemetry", "log"}
    for name, raw in env.items():
        parts = name.lower().split("__")
        if len(parts) < 2 or parts[0] not in sections:
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {name}: {p} is not a table")
        node[parts[-1]] = value
    return out


def _field_defaults(fields_of: type, prefix: str = "") -> dict[str, Any]:
    """The defaults of a config dataclass's fields by TOML key (the field name without
    ``prefix``). The parser takes its defaults from here, so each is written once, on the field;
    a field without one (or with None) makes its key required where a value must be read."""
    return {
        f.name.removeprefix(prefix): f.default
        for f in dataclasses.fields(fields_of)
        if f.name.startswith(prefix) and f.default is not dataclasses.MISSING
    }


def unknown_key(prefix: str, key: str, known: Iterable[str]) -> str:
    """The error for ``key``, unknown in the table at ``prefix`` (``"db."``; ``""`` at the top),
    naming the closest known key when there is one: most unknown keys are typos."""
    near = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"; did you mean {prefix}{near[0]}?" if near else ""
    return f"{prefix}{key}: unknown configuration key{hint}"


class _Reader:
    """Reads one TOML table, remembering which keys were used so leftovers can be refused.
    An absent key takes the default of the dataclass field the table fills (``defaults``)."""

    def __init__(
        self,
        data: Any,
        prefix: str,
        defaults: Mapping[str, Any] | None = None,
        ignored: list[str] | None = None,
    ) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix.rstrip('.')}: must be a table")
        self.data = data
        self.prefix = prefix
        self.defaults: Mapping[str, Any] = defaults or {}
        self.used: set[str] = set()
        # corrosion's keys found and not used, shared by the readers of one config
        self.ignored: list[str] = [] if ignored is None else ignored

    def _key(self, k: str) -> str:
        return self.prefix + k

    def mark(self, k: str) -> None:
        self.used.add(k)

    def get(self, k: str) -> Any:
        self.used.add(k)
        return self.data.get(k)

    def raw(self, k: str) -> Any:
        return self.get(k)

    def alias(self, k: str, other: str) -> Any:
        """``k``, also spelt ``other`` (corrosion's ``bind_addr``, ``uds_path``); not both."""
        value, spelt = self.get(k), self.get(other)
        if value is not None and spelt is not None:
            raise ConfigError(f"{self._key(k)}: given twice (also as {self._key(other)})")
        return value if value is not None else spelt

    def table(
        self, k: str, fields_of: type | None = None, *, prefix: str = "", required: bool = False
    ) -> _Reader:
        """The sub-table ``k``; ``fields_of`` (with ``prefix``): the dataclass whose field
        defaults its absent keys take."""
        v = self.get(k)
        if v is None and required:
            raise ConfigError(f"{self._key(k)}: section is required")
        defaults = _field_defaults(fields_of, prefix) if fields_of is not None else None
        return _Reader(v, self._key(k) + ".", defaults, self.ignored)

    def _default(self, k: str) -> Any:
        default = self.defaults.get(k)
        if default is None:
            raise ConfigError(f"{self._key(k)}: is required")
        return default

    def string(self, k: str) -> str:
        v = self.get(k)
        if v is None:
            return self._default(k)
        if not isinstance(v, str):
            raise ConfigError(f"{self._key(k)}: expected a string, got {type(v).__name__}")
        return v

    def opt_string(self, k: str) -> str | None:
        v = self.get(k)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{self._key(k)}: expected a string, got {type(v).__name__}")
        return v

    def string_list(self, k: str) -> list[str]:
        v = self.get(k)
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{self._key(k)}: expected a list of strings")
        return v

    def boolean(self, k: str) -> bool:
        v = self.get(k)
        if v is None:
            return self._default(k)
        if not isinstance(v, bool):
            raise ConfigError(f"{self._key(k)}: expected true or false, got {v!r}")
        return v

    def integer(self, k: str, *, lo: int | None = None, hi: int | None = None) -> int:
        v = self.get(k)
        if v is None:
            return self._default(k)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self._key(k)}: expected an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{self._key(k)}: {v} is out of range [{lo}, {hi}]")
        return v

    def number(self, k: str, *, lo: float | None = None) -> float:
        v = self.get(k)
        if v is None:
            return self._default(k)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{self._key(k)}: expected a number, got {v!r}")
        if lo is not None and v < lo:
            raise ConfigError(f"{self._key(k)}: must be at least {lo}")
        return float(v)

    def done(self) -> None:
        """Refuse a key nobody read, unless it is one of corrosion's (then it is ignored)."""
        corrosion_only = CORROSION_ONLY_KEYS.get(self.prefix.rstrip("."), frozenset())
        for k in sorted(set(self.data) - self.used):
            if k in corrosion_only:
                self.ignored.append(f"{self._key(k)} (a corrosion setting this agent does not use)")
                continue
            raise ConfigError(unknown_key(self.prefix, k, self.used | corrosion_only))
