"""The sans-IO PostgreSQL codec (corrosion.surfaces.pg_protocol): framing, SCRAM, values,
placeholders — without sockets (the real clients are in test_agent_pg)."""

from __future__ import annotations

import base64
import struct

import pytest

from corrosion.surfaces import pg_protocol as pgp


def typed(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def test_messages_split_across_reads_and_joined_in_one():
    startup_body = struct.pack("!i", pgp.PROTOCOL_3_0) + b"user\0ann\0database\0db\0\0"
    startup = struct.pack("!i", len(startup_body) + 4) + startup_body
    parse = typed(b"P", b"s1\0SELECT $1\0" + struct.pack("!hi", 1, pgp.INT8))
    bind_body = b"\0s1\0" + struct.pack("!hh", 1, 1) + struct.pack("!hiq", 1, 8, 42)
    bind = typed(b"B", bind_body + struct.pack("!hh", 1, 1))
    stream = startup + parse + bind + typed(b"E", b"\0" + struct.pack("!i", 0)) + typed(b"S", b"")
    parser = pgp.FrontendParser()
    got = []
    for i in range(len(stream)):  # one byte at a time: every message waits for its last byte
        parser.feed(stream[i : i + 1])
        while (msg := parser.next_message()) is not None:
            got.append(msg)
    assert got == [
        pgp.StartupMessage(pgp.PROTOCOL_3_0, {"user": "ann", "database": "db"}),
        pgp.Parse("s1", "SELECT $1", (pgp.INT8,)),
        pgp.Bind("", "s1", (1,), (struct.pack("!q", 42),), (1,)),
        pgp.Execute("", 0),
        pgp.Sync(),
    ]
    assert pgp.decode_param(got[2].params[0], pgp.INT8, 1, 1) == 42


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!i", 3),  # start-up packet shorter than its header
        struct.pack("!i", 100_000),  # start-up packet too long
        struct.pack("!ii", 12, pgp.PROTOCOL_3_0) + b"user",  # no terminating zero
    ],
)
def test_bad_startup_packets_are_violations(data):
    parser = pgp.FrontendParser()
    parser.feed(data + b"\0" * 8)
    with pytest.raises(pgp.ProtocolViolation):
        parser.next_message()


def test_bad_typed_messages_are_violations():
    for data in (
        typed(b"?", b""),  # unknown type
        typed(b"D", b"X\0"),  # Describe of neither a statement nor a portal
        typed(b"E", b"\0"),  # Execute without its row count
        typed(b"S", b"extra"),  # Sync with a body
        b"Q" + struct.pack("!i", 2),  # length shorter than itself
    ):
        parser = pgp.FrontendParser()
        parser.started = True
        parser.feed(data)
        with pytest.raises(pgp.ProtocolViolation):
            parser.next_message()


def test_scram_sha_256_rfc7677_exchange():
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    salted = pgp.scram_salted_password("pencil", salt)
    server = pgp.ScramServer(salted, salt, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    assert server.first("n,,n=user,r=rOprNGfwEbeRWgbNEkqO") == (
        f"r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    assert server.final(f"c=biws,r={nonce},p={proof}") == (
        "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    )
    wrong = pgp.ScramServer(pgp.scram_salted_password("pen", salt), salt, "x")
    wrong.first("n,,n=user,r=abc")
    with pytest.raises(pgp.AuthFailed):
        wrong.final(f"c=biws,r=abcx,p={proof}")
    with pytest.raises(pgp.AuthFailed):  # channel binding needs TLS, which this server has not
        pgp.ScramServer(salted, salt, "x").first("p=tls-server-end-point,,n=user,r=abc")


def test_values_in_text_and_binary():
    assert pgp.encode_value(42, pgp.INT8, 0) == b"42"
    assert pgp.encode_value(42, pgp.INT8, 1) == struct.pack("!q", 42)
    assert pgp.encode_value(float("inf"), pgp.FLOAT8, 0) == b"Infinity"
    assert pgp.encode_value(3, pgp.FLOAT8, 1) == struct.pack("!d", 3.0)
    assert pgp.encode_value(b"\x00\xff", pgp.BYTEA, 0) == b"\\x00ff"
    assert pgp.encode_value(1, pgp.BOOL, 0) == b"t"
    assert pgp.encode_value(1.5, pgp.TEXT, 1) == b"1.5"
    with pytest.raises(pgp.ValueFormatError, match="not an integer"):
        pgp.encode_value("x", pgp.INT8, 1, "n")
    assert pgp.decode_param(b"\\x00ff", pgp.BYTEA, 0, 1) == b"\x00\xff"
    assert pgp.decode_param(b"true", pgp.BOOL, 0, 1) == 1
    assert pgp.decode_param(b"2.5", pgp.NUMERIC, 0, 1) == 2.5
    assert pgp.decode_param(b"\x01", pgp.BOOL, 1, 1) == 1
    assert pgp.decode_param(b"\x01{}", pgp.JSONB, 1, 1) == "{}"
    with pytest.raises(pgp.ValueFormatError) as err:
        pgp.decode_param(b"abc", pgp.INT4, 1, 2)
    assert err.value.sqlstate == "22P03" and "$2" in str(err.value)
    with pytest.raises(pgp.ValueFormatError) as err:
        pgp.decode_param(b"\0\0", 1114, 1, 1)  # timestamp: binary not supported
    assert err.value.sqlstate == "0A000"


def test_column_types_from_declarations_and_values():
    assert pgp.column_oid("INTEGER", [1, None]) == pgp.INT8
    assert pgp.column_oid("BOOLEAN", []) == pgp.BOOL
    assert pgp.column_oid("VARCHAR(10)", []) == pgp.TEXT
    assert pgp.column_oid("INTEGER", [1, "x"]) == pgp.TEXT  # SQLite stores text there too
    assert pgp.column_oid(None, [1, 2.5]) == pgp.FLOAT8
    assert pgp.column_oid(None, [b"a"]) == pgp.BYTEA
    assert pgp.column_oid("NUMERIC", []) == pgp.TEXT


def test_placeholders_and_their_casts():
    sql, n, casts = pgp.rewrite_placeholders(
        "SELECT '$9', \"$8\", $1::int8, $2 /* $7 */ -- $6\n, $3 :: double precision"
    )
    assert sql == "SELECT '$9', \"$8\", $1, $2 /* $7 */ -- $6\n, $3"
    assert n == 3
    assert casts == {1: pgp.INT8, 3: pgp.FLOAT8}
    with pytest.raises(pgp.ValueFormatError, match="does not exist"):
        pgp.rewrite_placeholders("SELECT $1::nosuchtype")
