"""The PostgreSQL server (``api.pg.addr``): PostgreSQL clients — psql, psycopg, asyncpg, any
libpq or JDBC program — read and write the agent's database with SQLite's SQL.

Reads run on the local replica as ``POST /v1/queries`` does (``query_stream``, read-only
connections, the same ``sqlguard`` rules and ``api.query_timeout``); writes run as
``POST /v1/transactions`` does (``execute``: one corrosion transaction, replicated, the same
rules and ``api.transaction_timeout``). Outside a transaction block each write statement is its
own transaction. Inside ``BEGIN`` ... ``COMMIT`` the writes are kept and run at ``COMMIT`` as one
transaction (all apply, or none), and reads see the database as committed, without the block's
own writes; ``ROLLBACK`` drops them. With ``api.authz.bearer-token`` set, the password is the
token (SCRAM-SHA-256); without it, any user connects. A CancelRequest with the connection's key
interrupts the read it is running. The protocol itself (framing, types, SCRAM) is in
``pg_protocol``, without I/O.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskGroup

from crdt.schema import split_statements

from ..config import PgListener
from ..core.sqlguard import NOT_READONLY
from ..errors import CorrosionError
from ..runtime.results import (
    ExecResult,
    QueryError,
    QueryTimeout,
    TransactionError,
    TransactionRefused,
    TransactionTimeout,
)
from . import pg_protocol as pgp
from .interfaces import PgAgent
from .pg_protocol import Field
from .serving import Closer, serve_listener

log = logging.getLogger("corrosion.pg")

SERVER_VERSION = "16.0"  # what clients are told (they pick features by it); see docs/agent.md
STARTUP_TIMEOUT = 60.0  # seconds to start up and authenticate (PostgreSQL's default)
FLUSH_AT = 64 << 10  # bytes of rows buffered before they are sent
ROW_BATCH = 512


class PgError(CorrosionError):
    """An error the client is told in an ErrorResponse; the connection goes on."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


# SQLite's messages and the SQLSTATE PostgreSQL gives the same error
_SQLSTATES = [
    ("syntax error", "42601"),
    ("incomplete input", "42601"),
    ("unrecognized token", "42601"),
    ("no such table", "42P01"),
    ("unknown database", "42P01"),
    ("no such column", "42703"),
    ("no such function", "42883"),
    ("wrong number of arguments", "42883"),
    ("ambiguous column", "42702"),
    ("unique constraint failed", "23505"),
    ("not null constraint failed", "23502"),
    ("foreign key constraint failed", "23503"),
    ("check constraint failed", "23514"),
    ("datatype mismatch", "42804"),
    ("too many sql variables", "54000"),
    ("interrupted", "57014"),
]


def sqlstate_of(exc: Exception) -> str:
    """The SQLSTATE of an agent error: refusals (sqlguard) 42501, timeouts 57014, SQLite's
    errors by their message, anything else XX000."""
    if isinstance(exc, TransactionTimeout | QueryTimeout):
        return "57014"
    message = getattr(exc, "message", str(exc)).lower()
    for words, code in _SQLSTATES:
        if words in message:
            return code
    if isinstance(exc, TransactionRefused) or "not allowed" in message:
        return "42501"
    if message == NOT_READONLY.lower():
        return "25006"
    if isinstance(exc, QueryError) and not exc.client_error:
        return "XX000"
    return "42000" if isinstance(exc, QueryError | TransactionError) else "XX000"


@dataclass
class PgStats:
    """What the server counts (``corro_pg_*`` metrics read these through ``AgentEvents``)."""

    connections: int = 0
    protocol_errors: int = 0  # connections dropped for bytes that are not the protocol
    auth_failures: int = 0
    cancels: int = 0  # CancelRequests that matched a connection


# -- statements -----------------------------------------------------------------------------------

_FIRST_WORD = re.compile(r"\s*([A-Za-z_]+)")
_FUNCTION_QUERY = re.compile(
    r"\s*select\s+(?:pg_catalog\.)?(version|current_database|current_schema|current_user|"
    r"session_user|user|pg_backend_pid|pg_advisory_unlock_all)\s*(?:\(\s*\))?\s*;?\s*$",
    re.IGNORECASE,
)
_SHOW = re.compile(r"\s*show\s+([A-Za-z_.]+(?:\s+isolation\s+level)?)\s*;?\s*$", re.IGNORECASE)
_CATALOG = re.compile(r"\b(pg_catalog|information_schema|pg_[a-z_]+)\b", re.IGNORECASE)
_WRITE_TAGS = {"INSERT": "INSERT 0 {}", "REPLACE": "INSERT 0 {}", "UPDATE": "UPDATE {}"}
_NO_OPS = frozenset({"SET", "RESET", "DISCARD", "CLOSE", "UNLISTEN", "DEALLOCATE"})
_TRANSACTION_WORDS = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"})


_SCHEMA_QUERY = (
    "SELECT m.name, p.name, p.type FROM sqlite_schema AS m JOIN pragma_table_info(m.name) AS p "
    "WHERE m.type = 'table' AND m.name NOT GLOB 'sqlite_*' AND m.name NOT GLOB '__corro_*' "
    "AND m.name NOT GLOB 'crsql_*' AND m.name NOT GLOB '*__crsql_*' ORDER BY m.name, p.cid"
)
_IDENT = r'["`\[]?([A-Za-z_][\w$]*)["`\]]?'
_OP = r"(?:==|=|<>|!=|<=|>=|<|>|\bis(?:\s+not)?\b|\b(?:not\s+)?(?:like|glob)\b)"
_COLUMN_THEN_PARAM = re.compile(
    rf"(?:{_IDENT}\s*\.\s*)?{_IDENT}\s*{_OP}\s*\$(\d+)\b", re.IGNORECASE
)
_PARAM_THEN_COLUMN = re.compile(rf"\$(\d+)\s*{_OP}\s*(?:{_IDENT}\s*\.\s*)?{_IDENT}", re.IGNORECASE)
_COLUMN_IN = re.compile(
    rf"(?:{_IDENT}\s*\.\s*)?{_IDENT}\s+(?:not\s+)?(?:in\s*\(|between\s+)([^)]*?)(?:\)|$)",
    re.IGNORECASE,
)
_TABLE = re.compile(rf"\b(?:from|join|into|update)\s+(?:{_IDENT}\s*\.\s*)?{_IDENT}", re.I)
_FROM_LIST = re.compile(
    r"\bfrom\s+([^;()]*?)\s*(?:\bwhere\b|\bgroup\b|\border\b|\blimit\b|\bjoin\b|\bon\b|"
    r"\bunion\b|\bleft\b|\binner\b|\bcross\b|\bnatural\b|\)|$)",
    re.IGNORECASE,
)
_INSERT = re.compile(
    rf"\binsert\s+(?:or\s+\w+\s+)?into\s+(?:{_IDENT}\s*\.\s*)?{_IDENT}\s*"
    r"(?:\(([^)]*)\))?\s*values\s*\(([^)]*)\)",
    re.IGNORECASE,
)
_PARAM_ONLY = re.compile(r"\s*\$(\d+)\s*$")


def infer_param_types(
    sql: str, untyped: set[int], schema: dict[str, list[tuple[str, str | None]]]
) -> dict[int, int]:
    """Types of parameters from where they stand: compared with a column (``col = $1``,
    ``$1 < t.col``, ``col IN ($1, $2)``, ``col BETWEEN $1 AND $2``), assigned to one (``SET col
    = $1``) or inserted into one (``INSERT INTO t (a, b) VALUES ($1, $2)``), when the tables the
    statement names (``schema``: table -> [(column, declared type)]) agree on the column's
    type. Clients that encode parameters by their described type (asyncpg) need this."""
    named = {m.group(2).lower() for m in _TABLE.finditer(sql)}
    for m in _FROM_LIST.finditer(sql):  # FROM a, b AS x, c
        named |= {item.split()[0].strip('"`[]').lower() for item in m.group(1).split(",")}
    named &= set(schema)
    tables = {t: schema[t] for t in named} if named else schema

    def column_oid(column: str) -> int | None:
        oids = {
            pgp.oid_for_decltype(decl)
            for cols in tables.values()
            for name, decl in cols
            if name.lower() == column.lower()
        }
        return oids.pop() if len(oids) == 1 else None

    found: dict[int, int] = {}

    def note(index: int, oid: int | None) -> None:
        if index in untyped and oid is not None:
            found.setdefault(index, oid)

    for m in _INSERT.finditer(sql):
        table = m.group(2).lower()
        if table not in schema:
            continue
        names = (
            [c.strip().strip('"`[]') for c in m.group(3).split(",")]
            if m.group(3)
            else [name for name, _ in schema[table]]
        )
        decls = {name.lower(): decl for name, decl in schema[table]}
        for name, value in zip(names, m.group(4).split(","), strict=False):
            p = _PARAM_ONLY.match(value)
            if p is not None:
                note(int(p.group(1)), pgp.oid_for_decltype(decls.get(name.lower())))
    for m in _COLUMN_THEN_PARAM.finditer(sql):
        note(int(m.group(3)), column_oid(m.group(2)))
    for m in _PARAM_THEN_COLUMN.finditer(sql):
        note(int(m.group(1)), column_oid(m.group(3)))
    for m in _COLUMN_IN.finditer(sql):
        oid = column_oid(m.group(2))
        for p in re.finditer(r"\$(\d+)", m.group(3)):
            note(int(p.group(1)), oid)
    return found


def _first_word(sql: str) -> str:
    m = _FIRST_WORD.match(sql)
    return m.group(1).upper() if m else ""


@dataclass
class Canned:
    """A result the server answers itself (SHOW, ``SELECT version()``...)."""

    fields: list[Field]
    rows: list[tuple[Any, ...]]
    tag: str


@dataclass
class Prepared:
    """A parsed statement: ``kind`` "read", "write", "control" (transaction words, SET...),
    "canned" or "empty"; ``columns``: a read's (name, declared type)."""

    sql: str
    kind: str
    param_oids: list[int]
    columns: list[tuple[str, str | None]] = field(default_factory=list)
    canned: Canned | None = None
    described: list[Field] | None = None  # the row description a Describe gave the client


@dataclass
class Portal:
    prepared: Prepared
    params: dict[str, Any]
    formats: Sequence[int]
    fields: list[Field] | None = None
    stream: AsyncIterator[tuple[str, Any]] | None = None
    pending: list[tuple[Any, ...]] = field(default_factory=list)
    exhausted: bool = False
    sent: int = 0
    batch: int = ROW_BATCH

    async def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # type: ignore[attr-defined]


def _formats(formats: Sequence[int], n: int) -> list[int]:
    if not formats:
        return [0] * n
    if len(formats) == 1:
        return [formats[0]] * n
    if len(formats) != n:
        raise PgError("08P01", f"{len(formats)} result formats for {n} columns")
    return list(formats)


def _fields(
    columns: Sequence[tuple[str, str | None]], sample: Sequence[tuple], formats: Sequence[int]
) -> list[Field]:
    fmts = _formats(formats, len(columns))
    return [
        Field(
            name, pgp.column_oid(decl or _implied_type(name), [row[i] for row in sample]), fmts[i]
        )
        for i, (name, decl) in enumerate(columns)
    ]


def _dummy(oid: int) -> Any:
    """A value of type ``oid`` for a trial run of a statement."""
    if oid in (pgp.INT2, pgp.INT4, pgp.INT8, pgp.OID, pgp.BOOL):
        return 0
    if oid in (pgp.FLOAT4, pgp.FLOAT8, pgp.NUMERIC):
        return 0.0
    return b"" if oid == pgp.BYTEA else ""


def _implied_type(column: str) -> str | None:
    """The type of an unaliased expression column whose function always gives one."""
    name = column.lower()
    if name.startswith(("count(", "length(", "changes(", "total_changes(")):
        return "INTEGER"
    if name.startswith(("avg(", "total(")):
        return "REAL"
    return None


# -- the server -----------------------------------------------------------------------------------


class PgServer:
    """Serves PostgreSQL clients on one listener; knows its connections by their backend key
    (for CancelRequests, which arrive on a connection of their own)."""

    def __init__(self, agent: PgAgent, *, readonly: bool = False) -> None:
        self.agent = agent
        self.readonly = readonly  # api.pg.readonly: writes are refused
        self.stats = PgStats()
        self.sessions: dict[int, Session] = {}
        token = agent.config.api.bearer_token
        self._salt = secrets.token_bytes(16)
        # computed once: the password is fixed while the agent runs (PostgreSQL stores it so)
        self._salted = pgp.scram_salted_password(token, self._salt) if token else None

    async def handle(self, stream: SocketStream) -> None:
        self.stats.connections += 1
        conn = _Connection(stream)
        session: Session | None = None
        try:
            with anyio.fail_after(STARTUP_TIMEOUT):
                session = await self._startup(conn)
            if session is not None:
                await session.run()
                await conn.flush()  # what was answered before a pipelined Terminate
        except pgp.ProtocolViolation as exc:
            self.stats.protocol_errors += 1
            log.debug("pg: protocol violation from %s: %s", conn.peer, exc)
            with contextlib.suppress(Exception):
                await conn.send_now(pgp.error_response("08P01", str(exc), severity="FATAL"))
        except TimeoutError:
            log.debug("pg: %s did not start up in time", conn.peer)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except OSError as exc:  # a reset connection
            log.debug("pg: connection from %s: %s", conn.peer, exc)
        except Exception as exc:  # a bug here must not end the server: log it, close this one
            log.error("pg: connection from %s failed", conn.peer, exc_info=exc)
            with contextlib.suppress(Exception):
                await conn.send_now(
                    pgp.error_response("XX000", f"internal error: {exc!r}", severity="FATAL")
                )
        finally:
            if session is not None:
                self.sessions.pop(session.pid, None)
                await session.close_portals()
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _startup(self, conn: _Connection) -> Session | None:
        refused_encryption = False
        while True:
            msg = await conn.receive()
            if isinstance(msg, pgp.SSLRequest | pgp.GSSEncRequest):
                if refused_encryption and isinstance(msg, pgp.SSLRequest):
                    raise pgp.ProtocolViolation("a second SSLRequest")
                refused_encryption = True
                await conn.send_now(b"N")  # no TLS here: the client may go on in plaintext
                continue
            if isinstance(msg, pgp.CancelRequest):
                self._cancel(msg.pid, msg.key)
                return None
            if not isinstance(msg, pgp.StartupMessage):
                raise pgp.ProtocolViolation("expected a start-up message")
            return await self._authenticate(conn, msg)

    async def _authenticate(self, conn: _Connection, msg: pgp.StartupMessage) -> Session | None:
        major, minor = msg.version >> 16, msg.version & 0xFFFF
        if major != 3:
            await conn.send_now(
                pgp.error_response(
                    "0A000",
                    f"unsupported frontend protocol {major}.{minor}: the server supports 3.0",
                    severity="FATAL",
                )
            )
            return None
        options = sorted(k for k in msg.params if k.startswith("_pq_."))
        if minor > 0 or options:
            conn.send(pgp.negotiate_protocol_version(0, options))
        user = msg.params.get("user")
        if not user:
            await conn.send_now(
                pgp.error_response(
                    "28000", "no PostgreSQL user name specified in startup packet", severity="FATAL"
                )
            )
            return None
        if self._salted is not None and not await self._scram(conn, user):
            self.stats.auth_failures += 1
            await conn.send_now(
                pgp.error_response(
                    "28P01",
                    f'password authentication failed for user "{user}"',
                    severity="FATAL",
                    hint="the password is the agent's api.authz.bearer-token",
                )
            )
            return None
        conn.send(pgp.authentication_ok())
        session = Session(self, conn, msg.params)
        while session.pid in self.sessions or session.pid == 0:
            session.pid = secrets.randbits(31)
        self.sessions[session.pid] = session
        for name, value in session.parameters().items():
            conn.send(pgp.parameter_status(name, value))
        conn.send(pgp.backend_key_data(session.pid, session.key))
        return session

    async def _scram(self, conn: _Connection, user: str) -> bool:
        assert self._salted is not None
        await conn.send_now(pgp.authentication_sasl([pgp.SCRAM_MECHANISM]))
        msg = await conn.receive()
        if not isinstance(msg, pgp.PasswordMessage):
            raise pgp.ProtocolViolation("expected a SASL initial response")
        mechanism, first = pgp.parse_sasl_initial(msg.data)
        if mechanism != pgp.SCRAM_MECHANISM:
            return False
        scram = pgp.ScramServer(self._salted, self._salt, secrets.token_urlsafe(18))
        try:
            server_first = scram.first(first.decode())
            await conn.send_now(pgp.authentication_sasl_continue(server_first.encode()))
            msg = await conn.receive()
            if not isinstance(msg, pgp.PasswordMessage):
                raise pgp.ProtocolViolation("expected a SASL response")
            server_final = scram.final(msg.data.decode())
        except (pgp.AuthFailed, UnicodeDecodeError):
            return False
        conn.send(pgp.authentication_sasl_final(server_final.encode()))
        return True

    def _cancel(self, pid: int, key: int) -> None:
        session = self.sessions.get(pid)
        if session is None or not secrets.compare_digest(
            key.to_bytes(4, "big", signed=True), session.key.to_bytes(4, "big", signed=True)
        ):
            log.debug("pg: CancelRequest for no connection of ours (pid %d)", pid)
            return
        self.stats.cancels += 1
        session.cancel()


class _Connection:
    """A client's socket with the frame parser and an output buffer."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.parser = pgp.FrontendParser()
        self.out = bytearray()
        try:
            self.peer = str(stream.extra(anyio.abc.SocketAttribute.remote_address))
        except anyio.TypedAttributeLookupError:
            self.peer = "?"

    async def receive(self) -> pgp.Message:
        while True:
            msg = self.parser.next_message()
            if msg is not None:
                return msg
            await self.flush()
            self.parser.feed(await self.stream.receive(65536))

    def send(self, data: bytes) -> None:
        self.out += data

    async def send_now(self, data: bytes) -> None:
        self.out += data
        await self.flush()

    async def flush(self) -> None:
        if self.out:
            data, self.out = bytes(self.out), bytearray()
            await self.stream.send(data)


class Session:
    """One client connection after start-up: its prepared statements, portals and transaction
    block."""

    def __init__(self, server: PgServer, conn: _Connection, params: dict[str, str]) -> None:
        self.server = server
        self.agent = server.agent
        self.conn = conn
        self.startup = params
        self.pid = secrets.randbits(31)
        self.key = secrets.randbits(31)
        self.prepared: dict[str, Prepared] = {}
        self.portals: dict[str, Portal] = {}
        self.block: list[tuple[str, dict[str, Any]]] | None = None  # writes kept in BEGIN
        self.failed = False  # an error in the block: only COMMIT/ROLLBACK until its end
        self.skipping = False  # an extended-protocol error: skip messages until Sync
        self._reading: anyio.CancelScope | None = None
        self._cancelled = False

    def parameters(self) -> dict[str, str]:
        return {
            "server_version": SERVER_VERSION,
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "IntervalStyle": "postgres",
            "TimeZone": "UTC",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "is_superuser": "off",
            "application_name": self.startup.get("application_name", ""),
            "session_authorization": self.startup.get("user", ""),
        }

    @property
    def status(self) -> str:
        if self.block is None:
            return "I"
        return "E" if self.failed else "T"

    @property
    def reading(self) -> bool:
        """A read is running now (a CancelRequest would interrupt it)."""
        return self._reading is not None

    def cancel(self) -> None:
        """A CancelRequest: interrupt the read running now, if any."""
        if self._reading is not None:
            self._cancelled = True
            self._reading.cancel()

    async def run(self) -> None:
        self.conn.send(pgp.ready_for_query(self.status))
        while True:
            msg = await self.conn.receive()
            if isinstance(msg, pgp.Terminate):
                return
            if isinstance(msg, pgp.Query):
                await self._simple(msg.sql)
                self.conn.send(pgp.ready_for_query(self.status))
            elif isinstance(msg, pgp.Sync):
                self.skipping = False
                if self.block is None:
                    await self.close_portals()
                self.conn.send(pgp.ready_for_query(self.status))
                await self.conn.flush()
            elif isinstance(msg, pgp.Flush):
                await self.conn.flush()
            elif isinstance(msg, pgp.Parse | pgp.Bind | pgp.Describe | pgp.Execute | pgp.Close):
                if self.skipping:
                    continue
                try:
                    await self._extended(msg)
                except PgError as exc:
                    self._error(exc)
                    self.skipping = True
            elif isinstance(msg, pgp.Unsupported):
                what = "COPY" if msg.type in "dcf" else "the function call protocol"
                self._error(PgError("0A000", f"{what} is not supported"))
                if msg.type == "F":
                    self.conn.send(pgp.ready_for_query(self.status))
            else:
                raise pgp.ProtocolViolation(f"unexpected {type(msg).__name__} message")

    def _error(self, exc: PgError) -> None:
        if self.block is not None:
            self.failed = True
        self.conn.send(pgp.error_response(exc.sqlstate, exc.message, hint=exc.hint))

    async def close_portals(self) -> None:
        portals, self.portals = self.portals, {}
        for portal in portals.values():
            await portal.close()

    # -- the simple query protocol ---------------------------------------------------------------

    async def _simple(self, sql: str) -> None:
        statements = split_statements(sql)
        if not statements:
            self.conn.send(pgp.empty_query_response())
            return
        for statement in statements:
            try:
                prepared = await self._prepare(statement, [])
                if prepared.param_oids:
                    raise PgError("42P02", "there is no parameter $1 (a simple query has none)")
                portal = Portal(prepared, {}, ())
                try:
                    await self._run(portal, 0, describe=True)
                finally:
                    await portal.close()
            except PgError as exc:
                self._error(exc)
                return  # the rest of the query string is not run, as in PostgreSQL

    # -- the extended query protocol -------------------------------------------------------------

    async def _extended(self, msg: pgp.Message) -> None:
        if isinstance(msg, pgp.Parse):
            if msg.name and msg.name in self.prepared:
                raise PgError("42P05", f'prepared statement "{msg.name}" already exists')
            statements = split_statements(msg.sql)
            if len(statements) > 1:
                raise PgError("42601", "cannot insert multiple commands into a prepared statement")
            self.prepared[msg.name] = await self._prepare(
                statements[0] if statements else "", list(msg.param_oids)
            )
            self.conn.send(pgp.parse_complete())
        elif isinstance(msg, pgp.Bind):
            await self._bind(msg)
        elif isinstance(msg, pgp.Describe):
            await self._describe(msg)
        elif isinstance(msg, pgp.Execute):
            portal = self.portals.get(msg.portal)
            if portal is None:
                raise PgError("34000", f'portal "{msg.portal}" does not exist')
            await self._run(portal, msg.max_rows, describe=False)
        elif isinstance(msg, pgp.Close):
            if msg.kind == "S":
                self.prepared.pop(msg.name, None)
            else:
                portal = self.portals.pop(msg.name, None)
                if portal is not None:
                    await portal.close()
            self.conn.send(pgp.close_complete())

    async def _bind(self, msg: pgp.Bind) -> None:
        prepared = self.prepared.get(msg.statement)
        if prepared is None:
            raise PgError("26000", f'prepared statement "{msg.statement}" does not exist')
        oids = prepared.param_oids
        if len(msg.params) != len(oids):
            raise PgError(
                "08P01",
                f"bind message supplies {len(msg.params)} parameters, but prepared statement "
                f'"{msg.statement}" requires {len(oids)}',
            )
        formats = _formats(msg.param_formats, len(oids)) if oids else []
        params: dict[str, Any] = {}
        for i, (data, oid, fmt) in enumerate(zip(msg.params, oids, formats, strict=True)):
            try:
                params[str(i + 1)] = (
                    None if data is None else pgp.decode_param(data, oid, fmt, i + 1)
                )
            except pgp.ValueFormatError as exc:
                raise PgError(exc.sqlstate, str(exc)) from None
        old = self.portals.pop(msg.portal, None)
        if old is not None:
            if msg.portal:
                self.portals[msg.portal] = old
                raise PgError("42P03", f'cursor "{msg.portal}" already exists')
            await old.close()
        portal = Portal(prepared, params, msg.result_formats)
        if prepared.described is not None:  # keep the types the client was told
            fmts = _formats(msg.result_formats, len(prepared.described))
            portal.fields = [
                Field(f.name, f.oid, fmts[i]) for i, f in enumerate(prepared.described)
            ]
        self.portals[msg.portal] = portal
        self.conn.send(pgp.bind_complete())

    async def _describe(self, msg: pgp.Describe) -> None:
        if msg.kind == "S":
            prepared = self.prepared.get(msg.name)
            if prepared is None:
                raise PgError("26000", f'prepared statement "{msg.name}" does not exist')
            self.conn.send(pgp.parameter_description(prepared.param_oids))
            fields = await self._statement_fields(prepared)
            if fields is None:
                self.conn.send(pgp.no_data())
            else:
                prepared.described = fields
                self.conn.send(pgp.row_description(fields))
            return
        portal = self.portals.get(msg.name)
        if portal is None:
            raise PgError("34000", f'portal "{msg.name}" does not exist')
        fields = await self._portal_fields(portal)
        self.conn.send(pgp.no_data() if fields is None else pgp.row_description(fields))

    async def _statement_fields(self, prepared: Prepared) -> list[Field] | None:
        """A statement's columns before it is bound: by declared type; a column without one
        by the first row of a trial run, with a placeholder value of each parameter's type
        (clients that describe statements, as asyncpg does, decode by these types); text if
        that run returns no row."""
        if prepared.kind == "canned":
            assert prepared.canned is not None
            return prepared.canned.fields
        if prepared.kind != "read":
            return None
        sample: list[tuple] = []
        if any(decl is None and _implied_type(name) is None for name, decl in prepared.columns):
            dummies = {str(i + 1): _dummy(oid) for i, oid in enumerate(prepared.param_oids)}
            trial = Portal(prepared, dummies, (), batch=1)
            try:
                await self._start_read(trial)
                sample = trial.pending[:1]
            except PgError:
                pass  # the run itself will say what is wrong
            finally:
                await trial.close()
        return _fields(prepared.columns, sample, ())

    async def _portal_fields(self, portal: Portal) -> list[Field] | None:
        """A portal's columns: for a read, its first rows are read to type the columns that
        have no declared type."""
        prepared = portal.prepared
        if prepared.kind == "canned":
            assert prepared.canned is not None
            fmts = _formats(portal.formats, len(prepared.canned.fields))
            return [Field(f.name, f.oid, fmts[i]) for i, f in enumerate(prepared.canned.fields)]
        if prepared.kind != "read":
            return None
        if portal.fields is None:
            await self._start_read(portal)
            portal.fields = _fields(prepared.columns, portal.pending, portal.formats)
        return portal.fields

    # -- running statements ----------------------------------------------------------------------

    async def _prepare(self, sql: str, param_oids: list[int]) -> Prepared:
        """Classify and check a statement (reads are prepared on a read connection)."""
        try:
            rewritten, count, casts = pgp.rewrite_placeholders(sql)
        except pgp.ValueFormatError as exc:
            raise PgError(exc.sqlstate, str(exc)) from None
        oids = list(param_oids[:count]) + [0] * (count - len(param_oids))
        untyped = {i + 1 for i, oid in enumerate(oids) if not oid and i + 1 not in casts}
        if untyped:
            casts |= infer_param_types(rewritten, untyped, await self._schema())
        oids = [oid or casts.get(i + 1, pgp.TEXT) for i, oid in enumerate(oids)]
        word = _first_word(rewritten)
        if not rewritten:
            return Prepared("", "empty", oids)
        if word in _TRANSACTION_WORDS or word in _NO_OPS or word in ("SAVEPOINT", "RELEASE"):
            return Prepared(rewritten, "control", oids)
        canned = self._canned(rewritten)
        if canned is not None:
            return Prepared(rewritten, "canned", oids, canned=canned)
        try:
            columns = await self.agent.describe(rewritten)
        except QueryError as exc:
            if _CATALOG.search(rewritten):
                raise PgError(
                    "0A000",
                    f"PostgreSQL's catalog is not available here ({exc.message})",
                    hint="this is SQLite: read sqlite_schema, or PRAGMA table_info('t')",
                ) from None
            raise PgError(sqlstate_of(exc), exc.message) from None
        if columns is None:
            return Prepared(rewritten, "write", oids)
        return Prepared(rewritten, "read", oids, columns=columns)

    async def _schema(self) -> dict[str, list[tuple[str, str | None]]]:
        """The clients' tables and their columns' declared types (for ``infer_param_types``)."""
        schema: dict[str, list[tuple[str, str | None]]] = {}
        try:
            async for table, column, decl in self.agent.query(_SCHEMA_QUERY):
                schema.setdefault(table.lower(), []).append((column, decl or None))
        except QueryError as exc:
            log.debug("pg: no schema to type parameters by: %s", exc.message)
        return schema

    def _canned(self, sql: str) -> Canned | None:
        m = _FUNCTION_QUERY.match(sql)
        if m is not None:
            name = m.group(1).lower()
            values = {
                "version": f"PostgreSQL {SERVER_VERSION} (corrosion: SQLite behind a "
                "PostgreSQL protocol front)",
                "current_database": self.startup.get("database") or self.startup.get("user", ""),
                "current_schema": "main",
                "pg_backend_pid": self.pid,
                "pg_advisory_unlock_all": None,  # no advisory locks here (asyncpg's pool)
            }
            value = values.get(name, self.startup.get("user", ""))
            oid = pgp.INT4 if name == "pg_backend_pid" else pgp.TEXT
            return Canned([Field(name, oid)], [(value,)], "SELECT 1")
        m = _SHOW.match(sql)
        if m is not None:
            name = re.sub(r"\s+isolation\s+level", "_isolation", m.group(1).lower())
            known = {k.lower(): v for k, v in self.parameters().items()}
            known |= {"transaction_isolation": "serializable", "transaction_read_only": "off"}
            if name not in known:
                raise PgError("42704", f'unrecognized configuration parameter "{name}"')
            return Canned([Field(name, pgp.TEXT)], [(known[name],)], "SHOW")
        return None

    async def _run(self, portal: Portal, max_rows: int, *, describe: bool) -> None:
        """Execute a portal: send its rows (and, for a simple query, its row description
        first) and its command tag, or PortalSuspended after ``max_rows``."""
        prepared = portal.prepared
        if self.failed and not (
            prepared.kind == "control" and _first_word(prepared.sql) in _TRANSACTION_WORDS
        ):
            raise PgError(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            )
        if prepared.kind == "empty":
            self.conn.send(pgp.empty_query_response())
        elif prepared.kind == "control":
            await self._control(prepared.sql)
        elif prepared.kind == "write":
            await self._write(prepared.sql, portal.params)
        else:
            fields = await self._portal_fields(portal)
            assert fields is not None
            if describe:
                self.conn.send(pgp.row_description(fields))
            if prepared.kind == "canned":
                assert prepared.canned is not None
                await self._send_rows(fields, prepared.canned.rows)
                self.conn.send(pgp.command_complete(prepared.canned.tag))
            else:
                await self._send_read(portal, fields, max_rows)

    async def _send_rows(self, fields: list[Field], rows: Sequence[tuple]) -> None:
        try:
            for row in rows:
                self.conn.send(pgp.data_row(fields, row))
        except pgp.ValueFormatError as exc:
            raise PgError(exc.sqlstate, str(exc)) from None
        if len(self.conn.out) >= FLUSH_AT:
            await self.conn.flush()

    async def _start_read(self, portal: Portal) -> None:
        if portal.stream is not None or portal.exhausted:
            return
        stream = self.agent.query_stream(
            portal.prepared.sql, portal.params, batch=portal.batch, interruptible=True
        )
        portal.stream = stream.__aiter__()
        await self._next_batch(portal)  # the columns
        await self._next_batch(portal)  # the first rows

    async def _next_batch(self, portal: Portal) -> None:
        assert portal.stream is not None
        self._reading = scope = anyio.CancelScope()
        self._cancelled = False
        try:
            with scope:
                kind, payload = await portal.stream.__anext__()
                if kind == "rows":
                    portal.pending.extend(payload)
        except StopAsyncIteration:
            portal.exhausted = True
            await portal.close()
        except QueryError as exc:
            portal.exhausted = True
            await portal.close()
            if self._cancelled:
                raise PgError("57014", "canceling statement due to user request") from None
            raise PgError(sqlstate_of(exc), exc.message) from None
        finally:
            self._reading = None
        if scope.cancelled_caught:
            portal.exhausted = True
            await portal.close()
            raise PgError("57014", "canceling statement due to user request")

    async def _send_read(self, portal: Portal, fields: list[Field], max_rows: int) -> None:
        await self._start_read(portal)
        sent = 0
        while True:
            room = len(portal.pending)
            if max_rows > 0:
                room = min(room, max_rows - sent)
            rows, portal.pending = portal.pending[:room], portal.pending[room:]
            await self._send_rows(fields, rows)
            sent += room
            if (max_rows > 0 and sent >= max_rows) or portal.exhausted:
                break
            await self._next_batch(portal)
        portal.sent += sent
        if portal.pending or not portal.exhausted:
            self.conn.send(pgp.portal_suspended())
        else:
            self.conn.send(pgp.command_complete(f"SELECT {portal.sent}"))

    async def _write(self, sql: str, params: dict[str, Any]) -> None:
        word = _first_word(sql)
        if self.server.readonly:
            raise PgError(
                "25006",
                f"cannot execute {word} in a read-only transaction",
                hint="this listener has api.pg.readonly = true",
            )
        tag = _WRITE_TAGS.get(word, word + " {}")
        if self.block is not None:
            self.block.append((sql, params))
            self.conn.send(pgp.command_complete(tag.format(0)))
            return
        result = await self._commit([(sql, params)])
        self.conn.send(pgp.command_complete(tag.format(result.results[0]["rows_affected"])))

    async def _commit(self, statements: list[tuple[str, dict[str, Any]]]) -> ExecResult:
        try:
            return await self.agent.execute(statements)
        except TransactionError as exc:
            where = ""
            if len(statements) > 1 and exc.index is not None:
                where = f" (statement {exc.index + 1} of the transaction block)"
            raise PgError(sqlstate_of(exc), exc.message + where) from None

    async def _control(self, sql: str) -> None:
        word = _first_word(sql)
        if word in ("BEGIN", "START"):
            if self.block is not None:
                self.conn.send(
                    pgp.notice_response("25001", "there is already a transaction in progress")
                )
            else:
                self.block = []
            self.conn.send(pgp.command_complete("BEGIN"))
        elif word in ("COMMIT", "END"):
            block, failed = self.block, self.failed
            self.block, self.failed = None, False
            await self.close_portals()
            if block is None:
                self.conn.send(pgp.notice_response("25P01", "there is no transaction in progress"))
            elif block and not failed:
                await self._commit(block)
            self.conn.send(pgp.command_complete("ROLLBACK" if failed else "COMMIT"))
        elif word in ("ROLLBACK", "ABORT"):
            if re.match(r"\s*rollback\s+(work\s+|transaction\s+)?to\b", sql, re.IGNORECASE):
                raise PgError("0A000", "savepoints are not supported")
            if self.block is None:
                self.conn.send(pgp.notice_response("25P01", "there is no transaction in progress"))
            self.block, self.failed = None, False
            await self.close_portals()
            self.conn.send(pgp.command_complete("ROLLBACK"))
        elif word in ("SAVEPOINT", "RELEASE"):
            raise PgError("0A000", "savepoints are not supported")
        elif word == "SET":
            m = re.match(r"\s*set\s+(?:session\s+)?client_encoding\s*(?:=|to)\s*'?(\w+)", sql, re.I)
            if m and m.group(1).upper().replace("-", "") not in ("UTF8", "UNICODE"):
                raise PgError("22023", f"client_encoding {m.group(1)} is not supported: use UTF8")
            self.conn.send(pgp.command_complete("SET"))
        else:  # RESET, DISCARD, CLOSE, UNLISTEN, DEALLOCATE: nothing of theirs is kept here
            if word == "DEALLOCATE":
                name = sql.split()[-1].strip('";')
                if name.upper() == "ALL":
                    self.prepared.clear()
                else:
                    self.prepared.pop(name, None)
            tag = {"DISCARD": "DISCARD ALL", "CLOSE": "CLOSE CURSOR"}.get(word, word)
            self.conn.send(pgp.command_complete(tag))


async def start_pg(
    agent: PgAgent, tg: TaskGroup, config: PgListener
) -> tuple[Closer, tuple[str, int], PgServer]:
    """Listen on ``config.addr`` and serve PostgreSQL clients in ``tg``; return the closer,
    the bound address and the server (its ``stats``)."""
    host, port = config.addr
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)
    server = PgServer(agent, readonly=config.readonly)
    close = await serve_listener(tg, listener, server.handle)
    return close, (str(bound[0]), int(bound[1])), server
