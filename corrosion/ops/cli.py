"""The ``corrosion`` command line, shaped like corrosion's (global ``-c/--config``,
``--api-addr``, ``--db-path``, ``--admin-path``, accepted before or after the subcommand).

    corrosion agent                       run the agent from the config file
    corrosion exec SQL [--param ...]      one transaction through the API (/v1/transactions)
    corrosion query SQL [--columns]       rows through the API (/v1/queries), '|'-separated
    corrosion cluster members             membership, from the admin socket
    corrosion cluster membership-states   SWIM's view of every member (admin socket)
    corrosion cluster rejoin              announce this node to the seeds and known members
    corrosion sync generate               this node's sync state as JSON, from the admin socket
    corrosion sync reconcile-gaps         rewrite the gaps table from the bookkeeping
    corrosion plumtree stats              the broadcast trees (gossip.broadcast = "plumtree")
    corrosion actor version ACTOR VERSION what this node holds of one version
    corrosion subs list | info            the agent's subscriptions (admin socket)
    corrosion reload                      re-apply the schema files, through the admin socket
    corrosion schema apply FILE...        propose a schema version to the whole cluster
    corrosion schema show                 the cluster schema this node runs, and its state
    corrosion log set FILTER | reset      change the running agent's log levels (admin socket)
    corrosion profile [--seconds N]       profile the running agent into a cProfile file
    corrosion backup PATH                 a generic snapshot of the database
    corrosion restore PATH                replace the database with a snapshot (agent stopped)
    corrosion devcluster --nodes N        N local agents with a demo schema, to try things out
    corrosion template SRC:DST[:CMD]...   files rendered from the database, kept up to date
    corrosion keygen                      a new key for gossip.encryption_keys
    corrosion tls ca|server|client generate   certificates for gossip.tls
    corrosion --version                   the installed version

Client commands find the agent through the config file (``api.addr``, ``admin.path``,
``api.authz.bearer-token``) unless the flags say otherwise (``--token`` or ``CORROSION_TOKEN``
for the bearer token). Errors go to stderr with exit code 1.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import typer
from typer.core import TyperGroup

from ..config import Config, ConfigError, generate_key, gossip_security_error, parse_addr
from ..errors import CorrosionError, sole_error
from ..logs import ENV_VAR, level_spec, setup_logging
from ..runtime.dblock import database_in_use
from ..surfaces.admin_client import DEFAULT_PATH as DEFAULT_ADMIN_PATH
from ..surfaces.admin_client import (
    MAX_SOCKET_PATH,
    AdminError,
    AdminUnavailable,
    admin_request,
    agent_listening,
)
from ..surfaces.client import Client, ClientError
from .heap import settle_heap
from .pipes import closed_stdout_exits
from .startup import ListenError, check_addresses, explain

if TYPE_CHECKING:
    from ..runtime.extensions import AgentExtension

DEFAULT_CONFIG = Path("/etc/corrosion/config.toml")
GLOBAL_OPTIONS = ("-c", "--config", "--api-addr", "--db-path", "--admin-path", "--token")
TOKEN_ENV = "CORROSION_TOKEN"
# what a command can be given instead of a config file, by how it reaches the agent
API_ADDR_INSTEAD = "--api-addr HOST:PORT"
ADMIN_PATH_INSTEAD = "--admin-path SOCKET"
DB_PATH_INSTEAD = "--db-path FILE"

log = logging.getLogger("corrosion")


def flowing_text(text: str | None) -> str | None:
    """Help text with each paragraph on one line, for the terminal to wrap.

    Docstrings are wrapped at the source's line length; typer's rich help keeps those line
    breaks where it lists a group's commands (and in later paragraphs), so a sentence broke at
    the docstring's margin whatever the terminal's width. Blank lines still part paragraphs."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


class _HelpGroup(TyperGroup):
    """A group whose commands' help flows (see ``flowing_text``): the listing shows a command's
    help through its group, and ``COMMAND --help`` the command's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = flowing_text(self.help)
        for command in self.commands.values():
            command.help = flowing_text(command.help)
            command.short_help = flowing_text(command.short_help)


class _Group(_HelpGroup):
    """Accept the global options anywhere on the command line, as corrosion's
    ``#[arg(global = true)]`` does, by moving them in front of the subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))


def hoist_global_options(args: Sequence[str]) -> list[str]:
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        if a in GLOBAL_OPTIONS and i + 1 < len(args):
            front += args[i : i + 2]
            i += 2
            continue
        if a.startswith(tuple(o + "=" for o in GLOBAL_OPTIONS if o.startswith("--"))) or (
            a.startswith("-c") and not a.startswith("--") and len(a) > 2
        ):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def _command_group(help: str) -> typer.Typer:
    """A subcommand group (``corrosion cluster ...``), whose commands' help flows."""
    return typer.Typer(cls=_HelpGroup, help=help, no_args_is_help=True)


app = typer.Typer(
    cls=_Group,
    help="corrosion: gossip-replicated CRDT SQLite (a Python take on Fly.io's corrosion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cluster_app = _command_group("Cluster membership (through the admin socket).")
sync_app = _command_group("Replication state (through the admin socket).")
log_app = _command_group("The running agent's log levels (through the admin socket).")
subs_app = _command_group("Subscriptions (through the admin socket).")
actor_app = _command_group("Actors' versions (through the admin socket).")
tls_app = _command_group("Certificates for gossip.tls.")
tls_ca_app = _command_group("The cluster's certificate authority.")
tls_server_app = _command_group("Nodes' server certificates.")
tls_client_app = _command_group("Client certificates (mutual TLS).")
tls_app.add_typer(tls_ca_app, name="ca")
tls_app.add_typer(tls_server_app, name="server")
tls_app.add_typer(tls_client_app, name="client")
app.add_typer(cluster_app, name="cluster")
app.add_typer(sync_app, name="sync")
app.add_typer(log_app, name="log")
app.add_typer(subs_app, name="subs")
app.add_typer(actor_app, name="actor")
schema_app = _command_group("The cluster schema (through the admin socket).")
app.add_typer(schema_app, name="schema")
plumtree_app = _command_group(
    'The broadcast trees of gossip.broadcast = "plumtree" (through the admin socket).'
)
app.add_typer(plumtree_app, name="plumtree")
app.add_typer(tls_app, name="tls")


class CliError(CorrosionError):
    """Printed as ``error: <message>`` with exit code 1."""


# -- global options --------------------------------------------------------------------------


@dataclasses.dataclass
class Globals:
    config_path: Path
    api_addr: str | None
    db_path: Path | None
    admin_path: Path | None
    token: str | None = None
    _config: Config | None = None

    def config(self, instead: str | None = None) -> Config:
        """The config file, validated (``CliError`` naming the key when invalid). ``instead``:
        the flag that would do without it (``--api-addr HOST:PORT``), for the remedy said when
        no ``-c`` was given and the default file does not exist."""
        if self._config is None:
            try:
                self._config = Config.load(self.config_path)
            except ConfigError as exc:
                if self.config_path.exists():
                    raise CliError(f"invalid config: {exc}") from None
                raise CliError(f"{exc}{self.remedy(instead)}") from None
        return self._config

    def remedy(self, instead: str | None) -> str:
        """`` (pass -c CONFIG, or INSTEAD)`` when the config is the default one, which is
        missing; nothing when the user named a file (its path is the error then)."""
        if self.config_path != DEFAULT_CONFIG:
            return ""
        return f" (pass -c CONFIG, or {instead})" if instead else " (pass -c CONFIG)"

    def optional_config(self) -> Config | None:
        """The config if it loads, for defaults only (the token when ``--api-addr`` is given,
        the admin socket path), as corrosion does: best effort."""
        try:
            return self.config()
        except CliError:
            return None

    def api_client(self) -> Client:
        return Client(*self.api_target())

    def api_target(self) -> tuple[str, str | None]:
        """The agent's API address and bearer token, from the flags or the config."""
        cfg = self.optional_config() if self.api_addr else self.config(API_ADDR_INSTEAD)
        if self.api_addr:
            addr = self.api_addr
        elif cfg is not None and cfg.api.addrs:
            addr = "{}:{}".format(*cfg.api.addrs[0])
        else:
            raise CliError(f"no API address: pass --api-addr or set api.addr in {self.config_path}")
        token = self.token
        if token is None and cfg is not None:
            token = cfg.api.bearer_token
        return addr, token

    def db(self) -> Path:
        return self.db_path if self.db_path is not None else self.config(DB_PATH_INSTEAD).db.path

    def admin(self) -> Path:
        if self.admin_path is not None:
            return self.admin_path
        # The socket's path comes from the config: a file named with -c (or one at the default
        # path) that does not load is said, not replaced by the default socket of another agent.
        absent = self.config_path == DEFAULT_CONFIG and not self.config_path.exists()
        cfg = None if absent else self.config(ADMIN_PATH_INSTEAD)
        if cfg is not None:
            if self.db_path is not None:
                cfg = dataclasses.replace(cfg, db=dataclasses.replace(cfg.db, path=self.db_path))
            return cfg.admin_socket()
        return DEFAULT_ADMIN_PATH

    def agent_config(self) -> Config:
        """The config with the command-line overrides applied."""
        cfg = self.config()
        if self.api_addr:
            try:
                api = dataclasses.replace(cfg.api, addrs=(parse_addr(self.api_addr, "--api-addr"),))
            except ConfigError as exc:
                raise CliError(str(exc)) from None
            cfg = dataclasses.replace(cfg, api=api)
        if self.db_path is not None:
            cfg = dataclasses.replace(cfg, db=dataclasses.replace(cfg.db, path=self.db_path))
        if self.admin_path is not None:
            cfg = dataclasses.replace(cfg, admin_path=self.admin_path)
        return cfg


def _print_version(wanted: bool) -> None:
    if wanted:
        from ..version import package_version

        typer.echo(f"corrosion {package_version()}")
        raise typer.Exit()


@app.callback()
def _globals(
    ctx: typer.Context,
    config: Annotated[
        Path, typer.Option("-c", "--config", help="Config file path.", show_default=True)
    ] = DEFAULT_CONFIG,
    api_addr: Annotated[
        str | None, typer.Option("--api-addr", help="The agent's API address (host:port).")
    ] = None,
    db_path: Annotated[Path | None, typer.Option("--db-path", help="The database file.")] = None,
    admin_path: Annotated[
        Path | None, typer.Option("--admin-path", help="The agent's admin socket.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            help="The API's bearer token (default: api.authz.bearer-token of the config).",
            show_envvar=True,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,  # before the other options and the subcommand are looked at
            help="Print corrosion's version and exit.",
        ),
    ] = False,
) -> None:
    ctx.obj = Globals(config, api_addr, db_path, admin_path, token or None)


def _admin(ctx: typer.Context, cmd: str, **args: Any) -> Any:
    """``admin_request`` to the agent's admin socket; when that was the default socket because
    there is no config file, the error says how to name the right one."""
    g = _g(ctx)
    path = g.admin()
    try:
        return admin_request(path, cmd, **args)
    except AdminUnavailable as exc:
        if g.admin_path is None and not g.config_path.exists():
            raise CliError(
                f"{exc}; {g.config_path} does not exist, so this is the default socket"
                f"{g.remedy(ADMIN_PATH_INSTEAD)}"
            ) from None
        raise


def _g(ctx: typer.Context) -> Globals:
    obj = ctx.find_object(Globals)
    assert obj is not None
    return obj


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


class _Errors:
    """Turn the expected failures into ``error: ...`` and exit code 1."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, typer.Exit):
            return
        if isinstance(exc, ClientError) and exc.status == 401:
            hint = f"pass --token, set {TOKEN_ENV}, or set api.authz.bearer-token in the config"
            raise _fail(f"{exc} ({hint})") from None
        if isinstance(exc, CliError | ClientError | AdminError | AdminUnavailable):
            raise _fail(str(exc)) from None
        from .backup import BackupError

        if isinstance(exc, BackupError):
            raise _fail(str(exc)) from None


# -- running async code ----------------------------------------------------------------------


def run_async(fn: Any, *args: Any) -> Any:
    """asyncio with uvloop when installed (the fastest loop for the agent), plain asyncio
    otherwise: uvloop is an optional speed-up (the ``fast`` extra), so its absence is a DEBUG
    line, and nothing raised later is chained to its ImportError."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        log.debug("uvloop is not installed; running on the default asyncio loop")
        use_uvloop = False
    else:
        use_uvloop = True
    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": use_uvloop})


async def wait_for_stop(duration: float | None = None) -> str:
    """Until SIGINT/SIGTERM (or ``duration`` seconds); returns what stopped us."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        with anyio.move_on_after(duration if duration is not None else float("inf")):
            async for sig in signals:
                return signal.Signals(sig).name
    return f"{duration:g}s elapsed"


# -- agent -------------------------------------------------------------------------------------


def preflight(cfg: Config) -> None:
    """Checks that need the filesystem, done before anything is opened or bound."""
    import apsw

    from crdt.errors import SchemaError
    from crdt.schema import check_crr_constraints, load_schema_paths, parse_schema

    from ..runtime.schema_errors import for_operator

    problem = gossip_security_error(cfg.gossip)
    if problem is not None:
        raise CliError(f"invalid config: {problem}")
    try:  # the config names the files: a path that is missing or unreadable is its error
        sql = load_schema_paths(list(cfg.db.schema_paths))
    except (apsw.Error, OSError, ValueError) as exc:
        raise CliError(f"invalid config: db.schema_paths: {exc}") from None
    try:  # what the files say is the schema's error
        check_crr_constraints(parse_schema(sql), sql)
    except (apsw.Error, ValueError) as exc:
        said = for_operator(exc, cfg.db.schema_paths) if isinstance(exc, SchemaError) else exc
        raise CliError(f"schema (db.schema_paths): {said}") from None
    if cfg.admin_path is not None and len(str(cfg.admin_path).encode()) > MAX_SOCKET_PATH:
        raise CliError(f"invalid config: admin.path: longer than {MAX_SOCKET_PATH} bytes")
    if database_in_use(cfg.db.path):
        raise CliError(
            f"database {str(cfg.db.path)!r} is in use by a running agent: stop that agent first, "
            "or give this one another db.path"
        )
    try:
        check_addresses(cfg)
    except ListenError as exc:
        raise CliError(exc.strerror) from None
    if agent_listening(cfg.admin_socket(), timeout=2):
        raise CliError(
            f"admin.path: another agent is listening on {str(cfg.admin_socket())!r}: "
            "stop that agent first, or set another admin.path"
        )


async def _run_agent(
    cfg: Config,
    started: list[bool],
    allow_destructive: bool = False,
    extensions: Sequence[AgentExtension] = (),
) -> None:
    from ..agent import Agent

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # the agent logs "agent started" with every bound address
        async with Agent(cfg, allow_destructive=allow_destructive, extensions=extensions):
            started.append(True)
            settle_heap()
            async for sig in signals:
                log.info("%s received: leaving the cluster", signal.Signals(sig).name)
                break


@app.command()
def agent(
    ctx: typer.Context,
    allow_destructive: Annotated[
        bool,
        typer.Option(
            "--allow-destructive",
            help="At start-up, drop tables and columns the schema files no longer have.",
        ),
    ] = False,
) -> None:
    """Run the agent (until SIGINT/SIGTERM, then leave the cluster gracefully)."""
    g = _g(ctx)
    from ..runtime.extensions import load_extensions  # (the agent's: not for client commands)

    with _Errors():
        cfg = g.agent_config()
        preflight(cfg)
        try:  # the extensions' tables ([orchestrator]) are checked by the extensions
            extensions = load_extensions(cfg)
        except ConfigError as exc:
            raise CliError(f"invalid config: {exc}") from None
        try:  # log.level was checked with the config: only the environment can be wrong here
            setup_logging(cfg.log_format, cfg.log_colors, level_spec(cfg.log_level, os.environ))
        except ValueError as exc:
            raise CliError(f"{ENV_VAR}: {exc}") from None
    started: list[bool] = []
    try:
        run_async(_run_agent, cfg, started, allow_destructive, extensions)
    except Exception as exc:
        leaf = sole_error(exc)
        message = explain(leaf, cfg)
        what = "agent failed" if started else "cannot start"
        if message is None:  # not an expected failure: a bug, with its traceback
            log.error("%s: %s", what, leaf, exc_info=leaf)
        else:
            log.error("%s: %s", what, message)
        raise typer.Exit(1) from None


# -- exec and query ----------------------------------------------------------------------------

ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", help="A positional parameter (bound as text); repeatable."),
]
TimerOpt = Annotated[bool, typer.Option("--timer", help="Print the server-side time.")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help="Seconds the agent lets the statement run (default: its api config; 0: no limit).",
        min=0,
    ),
]


def _statement(sql: str, params: list[str] | None) -> Any:
    return [sql, list(params)] if params else sql


@app.command("exec")
def exec_(
    ctx: typer.Context,
    sql: Annotated[str, typer.Argument(metavar="SQL")],
    param: ParamOpt = None,
    timer: TimerOpt = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Run a statement that writes, in one transaction (POST /v1/transactions)."""
    with _Errors(), _g(ctx).api_client() as client:
        result = client.execute([_statement(sql, param)], timeout=timeout)
        for r in result.get("results", []):
            typer.echo(f"Rows affected: {r.get('rows_affected')}")
            if timer:
                typer.echo(f"Run Time: real {r.get('time')}")


def format_cell(v: Any) -> str:
    """As corrosion's CLI prints a cell: NULL empty, blobs as x'hex', text as is."""
    if v is None:
        return ""
    if isinstance(v, list):  # blobs travel as byte arrays
        try:
            return "x'" + bytes(v).hex() + "'"
        except (TypeError, ValueError):
            return json.dumps(v)
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


@app.command()
def query(
    ctx: typer.Context,
    sql: Annotated[str, typer.Argument(metavar="SQL")],
    columns: Annotated[
        bool, typer.Option("--columns", help="Print the column names first.")
    ] = False,
    param: ParamOpt = None,
    timer: TimerOpt = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Read with one statement (POST /v1/queries); rows are printed '|'-separated."""
    with _Errors(), _g(ctx).api_client() as client:
        params = list(param) if param else None
        for kind, payload in client.query_events(sql, params, timeout=timeout):
            if kind == "columns" and columns:
                typer.echo("|".join(payload))
            elif kind == "row":
                typer.echo("|".join(format_cell(c) for c in payload[1]))
            elif kind == "eoq" and timer:
                typer.echo(f"time: {payload.get('time')}s")


# -- admin socket commands ---------------------------------------------------------------------


@cluster_app.command("members")
def cluster_members(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The members this node knows, with their SWIM state."""
    with _Errors():
        members = _admin(ctx, "cluster members")
    if as_json:
        typer.echo(json.dumps(members, indent=2))
        return
    rows = [("ACTOR ID", "GOSSIP ADDR", "PEER ADDR", "STATE", "INCARNATION", "SCHEMA", "")]
    rows += [
        (
            m["actor_id"],
            m["addr"],
            m.get("peer_addr") or "-",
            m["state"],
            str(m["incarnation"]),
            "-" if m.get("schema_version") is None else f"v{m['schema_version']}",
            "(self)" if m.get("self") else "",
        )
        for m in members
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not any(not m.get("self") for m in members):
        typer.echo("(no other members known)")


@sync_app.command("generate")
def sync_generate(ctx: typer.Context) -> None:
    """This node's sync state as JSON: heads, gaps (need) and partial versions per actor."""
    with _Errors():
        state = _admin(ctx, "sync generate")
    typer.echo(json.dumps(state, indent=2, sort_keys=True))


@plumtree_app.command("stats")
def plumtree_stats(ctx: typer.Context) -> None:
    """The trees as JSON: counters since start (frames pushed, IHAVE ids, GRAFTs, PRUNEs), and
    per origin the eager and lazy peers; an error if this agent broadcasts by fan-out."""
    with _Errors():
        stats = _admin(ctx, "plumtree stats")
    typer.echo(json.dumps(stats, indent=2, sort_keys=True))


@app.command()
def reload(
    ctx: typer.Context,
    allow_destructive: Annotated[
        bool,
        typer.Option("--allow-destructive", help="Allow dropping tables and columns."),
    ] = False,
) -> None:
    """Re-apply the schema files (db.schema_paths, re-read from the agent's config file) on the
    running agent."""
    with _Errors():
        result = _admin(ctx, "reload", timeout=600, allow_destructive=allow_destructive)
    applied = result.get("applied", [])
    if not applied:
        typer.echo("schema unchanged")
    for line in applied:
        typer.echo(f"applied: {line}")
    for table in result.get("not_in_schema", []):
        typer.echo(f"not in the schema files, left alone (--allow-destructive drops it): {table}")
    pending = result.get("pending_schema", {})
    if pending.get("versions"):
        waiting = ", ".join(pending.get("missing", {})) or "a schema that merges them"
        typer.echo(f"still kept: {pending['versions']} versions waiting for {waiting}")


@schema_app.command("apply")
def schema_apply(
    ctx: typer.Context,
    files: Annotated[
        list[Path],
        typer.Argument(
            metavar="FILE...", help=".sql files, or directories of them: the whole schema."
        ),
    ],
    allow_destructive: Annotated[
        bool,
        typer.Option("--allow-destructive", help="Allow dropping tables and columns."),
    ] = False,
    wait: Annotated[
        float,
        typer.Option(help="Seconds to wait for every member (but those that left) to run it."),
    ] = 30.0,
) -> None:
    """Propose FILES as the cluster's next schema version: applied here at once, then by every
    node as it arrives. Fails, changing nothing, if the schema is invalid or destructive
    without --allow-destructive; fails if a concurrent proposal won (re-base and apply again)."""
    from crdt.errors import SchemaError
    from crdt.schema import load_schema_paths, parse_schema

    from ..runtime.schema_errors import for_operator

    with _Errors():
        try:
            sql = load_schema_paths(files)
            parse_schema(sql)  # here first, so that an error can name the file at fault
        except SchemaError as exc:
            raise CliError(str(for_operator(exc, files))) from None
        except OSError as exc:
            raise CliError(str(exc)) from None
        result = _admin(
            ctx,
            "schema apply",
            timeout=wait + 600,
            sql=sql,
            allow_destructive=allow_destructive,
            wait=wait,
        )
    for line in result["changes"]:
        typer.echo(f"applied: {line}")
    what = "proposed" if result["new"] else "already the cluster's schema:"
    typer.echo(f"{what} version {result['version']} ({result['hash'][:12]})")
    if result["unconfirmed"]:
        typer.echo(
            f"not yet running it after {wait:g}s (they apply it when it reaches them): "
            + ", ".join(result["unconfirmed"])
        )
    else:
        typer.echo("every member runs it")


@schema_app.command("show")
def schema_show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The cluster's latest schema text (to re-base on), then this node's schema state."""
    with _Errors():
        result = _admin(ctx, "schema show")
    if as_json:
        _print_json(result)
        return
    status = result["status"]
    typer.echo(result["schema"] or "-- no cluster schema version yet")
    typer.echo(
        f"-- this node runs version {status['version']} ({status['hash'][:12] or '-'}); the "
        f"cluster's latest is {status['cluster_version']}; source: {status['source']}"
    )
    for key in ("blocked", "drift"):
        if status[key]:
            typer.echo(f"-- {key}: {status[key]}")


@log_app.command("set")
def log_set(
    ctx: typer.Context,
    filter_: Annotated[
        str,
        typer.Argument(
            metavar="FILTER", help="A level (debug, info, ...) and/or name=level, comma-separated."
        ),
    ],
) -> None:
    """Set the agent's log levels until the next `log set` / `log reset` or restart."""
    with _Errors():
        result = _admin(ctx, "log set", filter=filter_)
    typer.echo(f"log filter: {result['filter']}")


@log_app.command("reset")
def log_reset(ctx: typer.Context) -> None:
    """Go back to the log levels the agent started with (log.level / CORROSION_LOG)."""
    with _Errors():
        result = _admin(ctx, "log reset")
    typer.echo(f"log filter: {result['filter']}")


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


@cluster_app.command("membership-states")
def cluster_membership_states(ctx: typer.Context) -> None:
    """Every member SWIM knows, down and left ones too, with its incarnation (JSON)."""
    with _Errors():
        _print_json(_admin(ctx, "cluster membership-states"))


@cluster_app.command("rejoin")
def cluster_rejoin(ctx: typer.Context) -> None:
    """Exchange membership again with the bootstrap seeds and every known member, announcing
    this node (after a partition, members that marked it down see it alive again)."""
    with _Errors():
        result = _admin(ctx, "cluster rejoin")
    asked = len(result["asked"])
    typer.echo(f"rejoined: {result['answered']} of {asked} members asked answered")


@sync_app.command("reconcile-gaps")
def sync_reconcile_gaps(ctx: typer.Context) -> None:
    """Rewrite the gaps table (__corro_bookkeeping_gaps) where it disagrees with the versions
    booked."""
    with _Errors():
        result = _admin(ctx, "sync reconcile-gaps", timeout=600)
    for r in result["reconciled"]:
        typer.echo(
            f"reconciled {r['actor_id']}: {r['deleted']} gap rows replaced by {r['inserted']}"
        )
    typer.echo(f"gaps consistent for {result['actors']} actors")


@actor_app.command("version")
def actor_version(
    ctx: typer.Context,
    actor_id: Annotated[str, typer.Argument(metavar="ACTOR_ID", help="A UUID or 32 hex digits.")],
    version: Annotated[int, typer.Argument(metavar="VERSION", min=1)],
) -> None:
    """What this node holds of one version of an actor (JSON): partial, current, or cleared."""
    with _Errors():
        _print_json(_admin(ctx, "actor version", actor_id=actor_id, version=version))


@subs_app.command("list")
def subs_list(ctx: typer.Context) -> None:
    """The subscriptions the agent runs (JSON): id, hash, SQL, listeners, last change id."""
    with _Errors():
        _print_json(_admin(ctx, "subs list"))


@subs_app.command("info")
def subs_info(
    ctx: typer.Context,
    hash_: Annotated[
        str | None, typer.Option("--hash", help="The subscription's corro-query-hash.")
    ] = None,
    id_: Annotated[str | None, typer.Option("--id", help="The subscription's id.")] = None,
) -> None:
    """One subscription, by hash or id (JSON)."""
    with _Errors():
        if hash_ is None and id_ is None:
            raise CliError("pass --hash or --id")
        result = (
            _admin(ctx, "subs info", hash=hash_)
            if hash_ is not None
            else _admin(ctx, "subs info", id=id_)
        )
        _print_json(result)


@app.command("profile")
def profile_agent(
    ctx: typer.Context,
    seconds: Annotated[
        float, typer.Option("--seconds", min=0.001, max=600, help="How long to profile.")
    ] = 10.0,
    out: Annotated[
        Path, typer.Option("--out", help="The file to write (cProfile/pstats format).")
    ] = Path("corrosion.prof"),
) -> None:
    """Profile the running agent's event loop for a while (cProfile, through the admin
    socket); read the file with `python -m pstats FILE` or snakeviz."""
    with _Errors():
        result = _admin(
            ctx, "profile", timeout=seconds + 60, seconds=seconds,
            out=str(out.resolve()),
        )  # fmt: skip
    typer.echo(f"profile of {result['seconds']:g}s written to {result['path']}")


OutDirOpt = Annotated[
    Path,
    typer.Option("--output-dir", help="Where the files go (default: the current directory)."),
]
CaKeyOpt = Annotated[Path, typer.Option("--ca-key", help="The CA's key (tls ca generate).")]
CaCertOpt = Annotated[Path, typer.Option("--ca-cert", help="The CA's certificate.")]


def _tls_command(make: Any, *args: Any) -> None:
    from .tls import TlsError

    try:
        cert, key = make(*args)
    except TlsError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {cert}")
    typer.echo(f"wrote {key}")


@tls_ca_app.command("generate")
def tls_ca_generate(output_dir: OutDirOpt = Path(".")) -> None:
    """Generate the cluster's certificate authority: ca_cert.pem and ca_key.pem (keep the key
    safe: it signs every node's certificate)."""
    from .tls import generate_ca

    _tls_command(generate_ca, output_dir)


@tls_server_app.command("generate")
def tls_server_generate(
    ip: Annotated[str, typer.Argument(metavar="IP", help="The address peers connect to.")],
    ca_key: CaKeyOpt,
    ca_cert: CaCertOpt,
    output_dir: OutDirOpt = Path("."),
) -> None:
    """Generate a node's server certificate for gossip.tls (server_cert.pem, server_key.pem),
    valid for IP, signed by the CA."""
    from .tls import generate_server_cert

    _tls_command(generate_server_cert, ca_cert, ca_key, ip, output_dir)


@tls_client_app.command("generate")
def tls_client_generate(
    ca_key: CaKeyOpt,
    ca_cert: CaCertOpt,
    output_dir: OutDirOpt = Path("."),
) -> None:
    """Generate a client certificate for gossip.tls.client, mutual TLS (client_cert.pem,
    client_key.pem), signed by the CA."""
    from .tls import generate_client_cert

    _tls_command(generate_client_cert, ca_cert, ca_key, output_dir)


# -- backup and restore ------------------------------------------------------------------------


@app.command()
def backup(ctx: typer.Context, path: Annotated[Path, typer.Argument(metavar="PATH")]) -> None:
    """Write a generic snapshot of the database (safe while the agent runs)."""
    from .backup import backup as do_backup

    with _Errors():
        info = do_backup(_g(ctx).db(), path)
    typer.echo(
        f"backed up to {info.path} ({info.size} bytes); actor {info.actor_id or '-'} made generic "
        f"({info.rows_rewritten} clock rows re-stamped)"
    )


@app.command()
def restore(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(metavar="PATH")],
    self_actor_id: Annotated[
        bool,
        typer.Option(
            "--self-actor-id",
            help="Keep this node's actor id (only when the backup is this node's latest state).",
        ),
    ] = False,
    actor_id: Annotated[
        str | None, typer.Option("--actor-id", help="Use this actor id (32 hex digits).")
    ] = None,
) -> None:
    """Replace the database with a backup (the agent must be stopped)."""
    from .backup import restore as do_restore

    g = _g(ctx)
    with _Errors():
        explicit = None
        if actor_id is not None:
            try:
                explicit = bytes.fromhex(actor_id.replace("-", ""))
            except ValueError:
                raise CliError("--actor-id: expected 32 hex digits") from None
        info = do_restore(
            path, g.db(), admin_path=g.admin(), keep_actor=self_actor_id, actor_id=explicit
        )
    who = f"actor {info.actor_id}" if info.actor_id else "a new actor id at the next start"
    typer.echo(
        f"restored {path} into {info.path} (old size {info.old_size}, new size {info.new_size});"
        f" {who}"
    )


# -- devcluster --------------------------------------------------------------------------------


@app.command()
def devcluster(
    nodes: Annotated[
        int, typer.Option("--nodes", "-n", min=1, max=50, help="How many agents.")
    ] = 3,
    duration: Annotated[
        float | None, typer.Option("--duration", help="Stop after this many seconds.")
    ] = None,
    base_dir: Annotated[
        Path | None,
        typer.Option(
            "--base-dir",
            help="Keep the nodes' data here (default: a temp dir); run again with the "
            "same directory to restart that cluster (its key and ports).",
        ),
    ] = None,
) -> None:
    """Start N agents on loopback with a demo schema and show how to talk to them."""
    from .devcluster import run_devcluster

    if not logging.getLogger().handlers:  # as basicConfig: logging set up by a host stays
        try:
            setup_logging("plaintext", True, level_spec("warning", os.environ))
        except ValueError as exc:
            raise _fail(f"{ENV_VAR}: {exc}") from None
    try:
        missing = run_async(run_devcluster, nodes, base_dir, duration, typer.echo, wait_for_stop)
    except Exception as exc:
        leaf = sole_error(exc)  # e.g. a port taken, or OTEL_* variables the agents refuse
        if isinstance(leaf, BrokenPipeError):  # `| head` stopped reading: not a start-up error
            raise leaf from None
        if isinstance(leaf, OSError | ConfigError):
            raise _fail(f"devcluster could not start: {leaf}") from None
        raise
    if missing:
        raise _fail(f"the demo write never reached {', '.join(missing)}")


@app.command()
def template(
    ctx: typer.Context,
    templates: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE:DESTINATION[:COMMAND]...",
            help="A Jinja2 template, the file it renders, and a shell command to run after.",
        ),
    ],
    once: Annotated[
        bool, typer.Option("--once", help="Render every template once and exit.")
    ] = False,
) -> None:
    """Render files from the database with Jinja2 templates (sql("SELECT ...") reads) and
    re-render them whenever what they read changes (until SIGINT/SIGTERM)."""
    from .template import TemplateError, Templates, parse_specs, render_all_once

    g = _g(ctx)
    with _Errors():
        try:
            specs = parse_specs(templates)
        except TemplateError as exc:
            raise CliError(str(exc)) from None
        addr, token = g.api_target()
        if once:
            with Client(addr, token) as client:
                try:
                    render_all_once(specs, client)
                except TemplateError as exc:
                    raise CliError(str(exc)) from None
            return
    if not logging.getLogger().handlers:
        try:
            setup_logging("plaintext", True, level_spec("info", os.environ))
        except ValueError as exc:
            raise _fail(f"{ENV_VAR}: {exc}") from None
    run_async(_run_templates, Templates(specs, addr, token))


async def _run_templates(templates: Any) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(templates.run)
        stopped_by = await wait_for_stop()
        log.info("%s received: stopping", stopped_by)
        tg.cancel_scope.cancel()


@app.command()
def keygen() -> None:
    """Print a new gossip encryption key (32 random bytes, base64) for gossip.encryption_keys;
    give every node of the cluster the same one."""
    typer.echo(generate_key())


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    with closed_stdout_exits():  # `corrosion query ... | head`: exit 1, no traceback
        app(args=list(argv) if argv is not None else None, prog_name="corrosion")


if __name__ == "__main__":
    main()
