"""The PostgreSQL frontend/backend protocol (version 3.0), sans-IO: bytes in, messages out, and
messages in, bytes out, as h11 does for HTTP. ``corrosion.surfaces.pg`` does the I/O.

* ``FrontendParser`` splits what a client sends into messages (the start-up packets, which have
  no type byte, then typed messages), refusing what is not the protocol (``ProtocolViolation``).
* The ``*_message`` functions encode what the server sends.
* ``ScramServer`` checks a SCRAM-SHA-256 exchange (RFC 5802/7677, as PostgreSQL does it).
* Values: PostgreSQL type OIDs for SQLite's declared types and values, and the text and binary
  formats of the types that SQLite stores (integers, reals, text, blobs; booleans as integers).
* ``rewrite_placeholders``: the ``$n`` parameters of a statement, and ``$n::type`` casts (SQLite
  has no ``::``), which tell a parameter's type.

Reference: https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CorrosionError

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP = 10_000  # bytes: PostgreSQL's own limit on a start-up packet
MAX_MESSAGE = 64 << 20  # bytes: a longer message is refused (PostgreSQL allows 1 GiB)

# -- type OIDs (pg_type.oid of the built-in types) -----------------------------------------------
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, FLOAT4, FLOAT8, UNKNOWN, BPCHAR, VARCHAR = 114, 700, 701, 705, 1042, 1043
NUMERIC, UUID, JSONB = 1700, 2950, 3802

TYPE_SIZES = {BOOL: 1, INT2: 2, INT4: 4, INT8: 8, FLOAT4: 4, FLOAT8: 8, OID: 4}
_TEXTUAL = frozenset({TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN, JSON, CHAR, 0})

# the type names a ``$n::type`` cast may give, by PostgreSQL's names and aliases
TYPE_NAMES = {
    "bool": BOOL, "boolean": BOOL, "bytea": BYTEA, "int2": INT2, "smallint": INT2,
    "int": INT4, "int4": INT4, "integer": INT4, "int8": INT8, "bigint": INT8, "oid": OID,
    "float4": FLOAT4, "real": FLOAT4, "float8": FLOAT8, "float": FLOAT8, "double": FLOAT8,
    "numeric": FLOAT8, "decimal": FLOAT8, "text": TEXT, "varchar": VARCHAR, "name": NAME,
    "char": BPCHAR, "bpchar": BPCHAR, "json": JSON, "jsonb": JSONB, "uuid": UUID,
}  # fmt: skip


class ProtocolViolation(CorrosionError):
    """The client sent something that is not the protocol: the connection is closed."""


class ValueFormatError(CorrosionError, ValueError):
    """A parameter's or a cell's value cannot be given in the type or format asked;
    ``sqlstate`` says which kind of error it is."""

    def __init__(self, message: str, sqlstate: str = "22P02") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# -- frontend messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSEncRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    key: int


@dataclass(frozen=True)
class StartupMessage:
    version: int
    params: dict[str, str]


@dataclass(frozen=True)
class PasswordMessage:
    """``p``: a password, or a SASL initial response or response (the auth state tells which)."""

    data: bytes


@dataclass(frozen=True)
class Query:
    sql: str


@dataclass(frozen=True)
class Parse:
    name: str
    sql: str
    param_oids: tuple[int, ...]


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True)
class Describe:
    kind: str  # "S" (statement) or "P" (portal)
    name: str


@dataclass(frozen=True)
class Execute:
    portal: str
    max_rows: int  # 0: all


@dataclass(frozen=True)
class Close:
    kind: str
    name: str


@dataclass(frozen=True)
class Sync:
    pass


@dataclass(frozen=True)
class Flush:
    pass


@dataclass(frozen=True)
class Terminate:
    pass


@dataclass(frozen=True)
class Unsupported:
    """A valid message this server does not implement (COPY data, FunctionCall)."""

    type: str


Message = (
    SSLRequest | GSSEncRequest | CancelRequest | StartupMessage | PasswordMessage | Query | Parse
    | Bind | Describe | Execute | Close | Sync | Flush | Terminate | Unsupported
)  # fmt: skip


class _Reader:
    """Reads a message body; running past its end is a protocol violation."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.body):
            raise ProtocolViolation("message is shorter than its contents")
        out = self.body[self.pos : self.pos + n]
        self.pos += n
        return out

    def int16(self) -> int:
        return int(struct.unpack("!h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack("!i", self.take(4))[0])

    def cstring(self) -> str:
        end = self.body.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolViolation("string without its terminating zero byte")
        raw = self.body[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("string is not valid UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolViolation("message is longer than its contents")


class FrontendParser:
    """Splits the bytes a client sends into messages: first start-up packets (SSLRequest,
    GSSENCRequest, CancelRequest, StartupMessage; no type byte), then, once the StartupMessage
    is read, typed messages. ``feed`` bytes, then take ``next_message()`` until it is None."""

    def __init__(self, *, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self.started = False  # the StartupMessage was read

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> Message | None:
        if not self.started:
            return self._startup_packet()
        if len(self._buf) < 5:
            return None
        kind = chr(self._buf[0])
        (length,) = struct.unpack_from("!i", self._buf, 1)
        if length < 4 or length > self._max:
            raise ProtocolViolation(f"invalid message length {length} (type {kind!r})")
        if len(self._buf) < 1 + length:
            return None
        body = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return _typed_message(kind, body)

    def _startup_packet(self) -> Message | None:
        if len(self._buf) < 4:
            return None
        (length,) = struct.unpack_from("!i", self._buf)
        if length < 8 or length > MAX_STARTUP:
            raise ProtocolViolation(f"invalid length of start-up packet ({length})")
        if len(self._buf) < length:
            return None
        r = _Reader(bytes(self._buf[4:length]))
        del self._buf[:length]
        code = r.int32()
        if code == SSL_REQUEST:
            r.end()
            return SSLRequest()
        if code == GSSENC_REQUEST:
            r.end()
            return GSSEncRequest()
        if code == CANCEL_REQUEST:
            pid, key = r.int32(), r.int32()
            return CancelRequest(pid, key)
        params: dict[str, str] = {}
        while True:
            name = r.cstring()
            if not name:
                break
            params[name] = r.cstring()
        r.end()
        self.started = True
        return StartupMessage(code, params)


def _typed_message(kind: str, body: bytes) -> Message:
    r = _Reader(body)
    msg: Message
    if kind == "Q":
        msg = Query(r.cstring())
    elif kind == "P":
        name, sql = r.cstring(), r.cstring()
        msg = Parse(name, sql, tuple(r.int32() & 0xFFFFFFFF for _ in range(r.int16())))
    elif kind == "B":
        portal, statement = r.cstring(), r.cstring()
        formats = tuple(r.int16() for _ in range(r.int16()))
        params: list[bytes | None] = []
        for _ in range(r.int16()):
            n = r.int32()
            params.append(None if n == -1 else r.take(n))
        results = tuple(r.int16() for _ in range(r.int16()))
        msg = Bind(portal, statement, formats, tuple(params), results)
    elif kind in ("D", "C"):
        which = r.take(1).decode("latin-1")
        if which not in ("S", "P"):
            raise ProtocolViolation(f"invalid {kind} target {which!r}: expected 'S' or 'P'")
        name = r.cstring()
        msg = Describe(which, name) if kind == "D" else Close(which, name)
    elif kind == "E":
        msg = Execute(r.cstring(), r.int32())
    elif kind == "p":
        return PasswordMessage(body)
    elif kind == "S":
        msg = Sync()
    elif kind == "H":
        msg = Flush()
    elif kind == "X":
        msg = Terminate()
    elif kind in ("d", "c", "f", "F"):
        return Unsupported(kind)
    else:
        raise ProtocolViolation(f"invalid frontend message type {kind!r}")
    r.end()
    return msg


# -- backend messages -----------------------------------------------------------------------------


def _message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def authentication_ok() -> bytes:
    return _message(b"R", struct.pack("!i", 0))


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    return _message(b"R", struct.pack("!i", 10) + b"".join(_cstr(m) for m in mechanisms) + b"\0")


def authentication_sasl_continue(data: bytes) -> bytes:
    return _message(b"R", struct.pack("!i", 11) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _message(b"R", struct.pack("!i", 12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return _message(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return _message(b"K", struct.pack("!ii", pid, key))


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str]) -> bytes:
    body = struct.pack("!ii", newest_minor, len(unrecognized))
    return _message(b"v", body + b"".join(_cstr(o) for o in unrecognized))


def ready_for_query(status: str) -> bytes:
    """``status``: "I" idle, "T" in a transaction block, "E" in a failed one."""
    return _message(b"Z", status.encode())


@dataclass(frozen=True)
class Field:
    """A result column as RowDescription gives it."""

    name: str
    oid: int
    format: int = 0  # 0 text, 1 binary


def row_description(fields: Sequence[Field]) -> bytes:
    parts = [struct.pack("!h", len(fields))]
    for f in fields:
        size = TYPE_SIZES.get(f.oid, -1)
        parts.append(_cstr(f.name) + struct.pack("!ihihih", 0, 0, f.oid, size, -1, f.format))
    return _message(b"T", b"".join(parts))


def parameter_description(oids: Sequence[int]) -> bytes:
    return _message(b"t", struct.pack(f"!h{len(oids)}i", len(oids), *oids))


def data_row(fields: Sequence[Field], row: Sequence[Any]) -> bytes:
    parts = [struct.pack("!h", len(row))]
    for f, value in zip(fields, row, strict=True):
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
            continue
        cell = encode_value(value, f.oid, f.format, f.name)
        parts.append(struct.pack("!i", len(cell)) + cell)
    return _message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return _message(b"C", _cstr(tag))


def empty_query_response() -> bytes:
    return _message(b"I")


def parse_complete() -> bytes:
    return _message(b"1")


def bind_complete() -> bytes:
    return _message(b"2")


def close_complete() -> bytes:
    return _message(b"3")


def no_data() -> bytes:
    return _message(b"n")


def portal_suspended() -> bytes:
    return _message(b"s")


def _notice_fields(severity: str, code: str, message: str, hint: str | None) -> bytes:
    fields = [b"S" + _cstr(severity), b"V" + _cstr(severity), b"C" + _cstr(code)]
    fields.append(b"M" + _cstr(message))
    if hint:
        fields.append(b"H" + _cstr(hint))
    return b"".join(fields) + b"\0"


def error_response(
    code: str, message: str, *, severity: str = "ERROR", hint: str | None = None
) -> bytes:
    """``severity`` "FATAL" when the server closes the connection after it."""
    return _message(b"E", _notice_fields(severity, code, message, hint))


def notice_response(code: str, message: str, *, severity: str = "WARNING") -> bytes:
    return _message(b"N", _notice_fields(severity, code, message, None))


# -- SCRAM-SHA-256 --------------------------------------------------------------------------------

SCRAM_MECHANISM = "SCRAM-SHA-256"
SCRAM_ITERATIONS = 4096


class AuthFailed(CorrosionError):
    """The client did not prove it knows the password (SQLSTATE 28P01)."""


def scram_salted_password(password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> bytes:
    """Hi(password, salt, i) of RFC 5802 (ASCII passwords need no SASLprep)."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


class ScramServer:
    """The server's side of one SCRAM-SHA-256 exchange: ``first(client_first)`` gives the
    server-first message, ``final(client_final)`` checks the proof (``AuthFailed``) and gives
    the server-final message. ``salted``: ``scram_salted_password`` of the expected password
    with ``salt``; ``nonce``: fresh random text from the caller (this class draws none)."""

    def __init__(self, salted: bytes, salt: bytes, nonce: str) -> None:
        self._salted = salted
        self._salt = salt
        self._nonce = nonce
        self._client_first_bare = ""
        self._server_first = ""
        self._combined_nonce = ""

    def first(self, client_first: str) -> str:
        gs2, sep, bare = client_first.partition(",,")
        if not sep or gs2.split(",")[0] not in ("n", "y"):
            # "p=...": channel binding, which needs TLS (this server has none to bind to)
            raise AuthFailed("SCRAM channel binding is not supported")
        attrs = _scram_attrs(bare)
        if "r" not in attrs:
            raise ProtocolViolation("SCRAM client-first message without a nonce")
        self._client_first_bare = bare
        self._combined_nonce = attrs["r"] + self._nonce
        salt = base64.b64encode(self._salt).decode()
        self._server_first = f"r={self._combined_nonce},s={salt},i={SCRAM_ITERATIONS}"
        return self._server_first

    def final(self, client_final: str) -> str:
        without_proof, _, proof_attr = client_final.rpartition(",p=")
        attrs = _scram_attrs(without_proof)
        if attrs.get("r") != self._combined_nonce:
            raise AuthFailed("SCRAM nonce mismatch")
        try:
            proof = base64.b64decode(proof_attr, validate=True)
        except ValueError:
            raise AuthFailed("SCRAM proof is not base64") from None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = hmac.digest(self._salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise AuthFailed("SCRAM proof has the wrong length")
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(recovered).digest(), stored_key):
            raise AuthFailed("wrong password")
        server_key = hmac.digest(self._salted, b"Server Key", "sha256")
        verifier = hmac.digest(server_key, auth_message, "sha256")
        return "v=" + base64.b64encode(verifier).decode()


def _scram_attrs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and len(key) == 1:
            out.setdefault(key, value)
    return out


def parse_sasl_initial(data: bytes) -> tuple[str, bytes]:
    """A SASLInitialResponse's mechanism and client-first message."""
    r = _Reader(data)
    mechanism = r.cstring()
    n = r.int32()
    payload = b"" if n == -1 else r.take(n)
    r.end()
    return mechanism, payload


# -- values ---------------------------------------------------------------------------------------


def oid_for_decltype(decltype: str | None) -> int | None:
    """The PostgreSQL type of a column declared ``decltype`` (SQLite's affinity rules, booleans
    first), or None when the declaration does not fix one (no type, NUMERIC, dates...)."""
    if not decltype:
        return None
    d = decltype.upper()
    if "BOOL" in d:
        return BOOL
    if "INT" in d:
        return INT8
    if "CHAR" in d or "CLOB" in d or "TEXT" in d or "JSON" in d:
        return TEXT
    if "BLOB" in d:
        return BYTEA
    if "REAL" in d or "FLOA" in d or "DOUB" in d:
        return FLOAT8
    return None


def oid_for_values(values: Sequence[Any]) -> int:
    """The type of a column from its values (NULLs aside): integers int8, numbers float8,
    blobs bytea, anything else (text, a mix, nothing) text."""
    kinds = {type(v) for v in values if v is not None}
    if kinds == {int}:
        return INT8
    if kinds and kinds <= {int, float}:
        return FLOAT8
    if kinds == {bytes}:
        return BYTEA
    return TEXT


def _fits(oid: int, values: Sequence[Any]) -> bool:
    if oid in (INT8, BOOL):
        return all(v is None or isinstance(v, int) for v in values)
    if oid == FLOAT8:
        return all(v is None or isinstance(v, int | float) for v in values)
    return True


def column_oid(decltype: str | None, sample: Sequence[Any]) -> int:
    """A result column's type: its declared type when the values read so far fit it (SQLite
    stores any value in any column), else the values' (``oid_for_values``)."""
    oid = oid_for_decltype(decltype)
    if oid is not None and _fits(oid, sample):
        return oid
    return oid_for_values(sample)


def _float_text(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(v)


def encode_value(value: Any, oid: int, fmt: int, column: str = "") -> bytes:
    """A non-NULL cell in ``oid``'s text (``fmt`` 0) or binary (1) format."""
    if oid == INT8:
        if isinstance(value, int):
            return str(value).encode() if fmt == 0 else struct.pack("!q", value)
        raise ValueFormatError(
            f"column {column!r} holds {value!r}, not an integer (SQLite stores any value in any "
            "column): CAST it in the query", "22P02"
        )  # fmt: skip
    if oid == FLOAT8:
        if isinstance(value, int | float):
            return _float_text(float(value)).encode() if fmt == 0 else struct.pack("!d", value)
        raise ValueFormatError(f"column {column!r} holds {value!r}, not a number", "22P02")
    if oid == BOOL:
        if isinstance(value, int | float):
            if fmt == 0:
                return b"t" if value else b"f"
            return b"\x01" if value else b"\x00"
        raise ValueFormatError(f"column {column!r} holds {value!r}, not a boolean", "22P02")
    if oid == BYTEA:
        raw = value if isinstance(value, bytes) else _text_of(value).encode()
        return b"\\x" + raw.hex().encode() if fmt == 0 else raw
    return _text_of(value).encode()  # text (any format: text's binary form is its bytes)


def _text_of(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float):
        return _float_text(value)
    return str(value)


_BINARY_PARAM = {INT2: "!h", INT4: "!i", INT8: "!q", OID: "!I", FLOAT4: "!f", FLOAT8: "!d"}
_TRUE = frozenset({"t", "true", "1", "on", "y", "yes"})
_FALSE = frozenset({"f", "false", "0", "off", "n", "no"})


def decode_param(data: bytes, oid: int, fmt: int, index: int) -> Any:
    """A Bind parameter as SQLite binds it (booleans 0/1, uuids and json as text)."""
    where = f"parameter ${index}"
    if fmt == 1:
        if oid in _BINARY_PARAM:
            code = _BINARY_PARAM[oid]
            if len(data) != struct.calcsize(code):
                raise ValueFormatError(f"{where}: {len(data)} bytes for a {code} value", "22P03")
            return struct.unpack(code, data)[0]
        if oid == BOOL:
            if len(data) != 1:
                raise ValueFormatError(f"{where}: a boolean is one byte", "22P03")
            return int(data != b"\0")
        if oid == BYTEA:
            return data
        if oid == JSONB:
            if not data.startswith(b"\x01"):
                raise ValueFormatError(f"{where}: unknown jsonb version", "22P03")
            data = data[1:]
        elif oid == UUID:
            if len(data) != 16:
                raise ValueFormatError(f"{where}: a uuid is 16 bytes", "22P03")
            return str(uuid.UUID(bytes=data))
        elif oid not in _TEXTUAL:
            raise ValueFormatError(
                f"{where}: the binary format of type {oid} is not supported: send it as text",
                "0A000",
            )
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueFormatError(f"{where}: not valid UTF-8", "22021") from None
    if fmt == 1 or oid in _TEXTUAL or oid in (JSONB, UUID):
        return text
    try:
        if oid in (INT2, INT4, INT8, OID):
            return int(text)
        if oid in (FLOAT4, FLOAT8, NUMERIC):
            return float(text) if any(c in text for c in ".eEnN") else int(text)
    except ValueError:
        raise ValueFormatError(f"{where}: invalid input {text!r} for type {oid}") from None
    if oid == BOOL:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return int(word in _TRUE)
        raise ValueFormatError(f"{where}: invalid input {text!r} for a boolean")
    if oid == BYTEA:
        if text.startswith("\\x"):
            try:
                return bytes.fromhex(text[2:])
            except ValueError:
                raise ValueFormatError(f"{where}: invalid hexadecimal bytea") from None
        return data
    return text


# -- statements -----------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$(\d+)(?:\s*::\s*([A-Za-z_][A-Za-z0-9_]*(?:\s+precision)?))?")
_QUOTES = {"'": "'", '"': '"', "`": "`", "[": "]"}


def rewrite_placeholders(sql: str) -> tuple[str, int, dict[int, int]]:
    """``sql`` with each ``$n::type`` cast on a parameter dropped (SQLite binds ``$n`` as a
    named parameter but has no ``::``), the number of parameters (the highest ``n``), and the
    type OIDs those casts gave. Quoted text and comments are left alone."""
    out: list[str] = []
    count = 0
    casts: dict[int, int] = {}
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in _QUOTES:
            end = sql.find(_QUOTES[ch], i + 1)
            end = n - 1 if end == -1 else end
            out.append(sql[i : end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end == -1 else end
            out.append(sql[i:end])
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end == -1 else end + 2
            out.append(sql[i:end])
            i = end
        elif ch == "$" and (m := _PLACEHOLDER.match(sql, i)):
            index = int(m.group(1))
            count = max(count, index)
            if m.group(2):
                type_name = m.group(2).lower().split()[0]
                oid = TYPE_NAMES.get(type_name)
                if oid is None:
                    raise ValueFormatError(f"type {m.group(2)!r} does not exist", "42704")
                casts[index] = oid
            out.append(f"${index}")
            i = m.end()
        else:
            out.append(ch)
            i += 1
    return "".join(out), count, casts
