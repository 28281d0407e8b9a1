"""The trace context a changeset carries on the wire (its optional 11th field), and peers that
predate it: a frame without the field is the frame of before, a decoder ignores fields after
the ones it knows, and a peer whose membership metadata do not say it accepts them only ever
gets ten-field frames (broadcast, relayed or answered by sync). Sans-IO: replicators and stores,
no sockets. The tracing configuration (``[telemetry] open-telemetry``, ``OTEL_*``) is here too."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import msgpack
import pytest
from agent_helpers import commit_now
from test_agent_replication import replicator, store, table

import swim
from corrosion.config import Config, ConfigError, OpenTelemetryConfig, apply_env
from corrosion.core.changeset import (
    chunk_version,
    decode_frame,
    encode,
    peek_changeset,
    trace_of,
    without_trailing,
)
from corrosion.core.replication import (
    SendFrame,
    decode_meta,
    encode_meta,
    meta_trailing_fields,
)
from corrosion.runtime import tracing
from corrosion.runtime.peers import changes_in

TRACE = b"\0" + bytes(range(1, 25)) + b"\x01"  # version 0, trace id, span id, sampled


def fields(frame: bytes) -> list:
    return msgpack.unpackb(frame, raw=False)


def old_meta(actor: bytes) -> bytes:
    """The membership metadata of a peer from before trailing fields: no ``t``."""
    return msgpack.packb({"a": actor, "p": 0, "c": 0}, use_bin_type=True)


def member_up(meta: bytes, port: int) -> swim.MemberUp:
    member = swim.Member(swim.NodeId("10.0.0.9", port, 0), 1, swim.State.ALIVE, meta)
    return swim.MemberUp(member)


def test_a_frame_without_a_trace_is_the_frame_of_before_and_one_with_it_round_trips(tmp_path):
    s = store(tmp_path, "a")
    _, commit = commit_now(s, [("INSERT INTO t (id, body) VALUES (1, 'x')", ())], ts=1)
    [plain] = chunk_version(s.actor_id, 1, commit.changes, commit.last_seq, 1, 1)
    frame = encode(plain)
    assert frame[0] == 0x9A and len(fields(frame)) == 10  # what every peer decodes
    assert decode_frame(frame)[1] == plain and plain.trace is None

    [traced] = chunk_version(s.actor_id, 1, commit.changes, commit.last_seq, 1, 1, trace=TRACE)
    long = encode(traced)
    assert len(fields(long)) == 11 and fields(long)[10] == TRACE
    assert decode_frame(long)[1] == traced and trace_of(long) == TRACE and trace_of(frame) is None
    assert peek_changeset(long) == peek_changeset(frame)  # the duplicate check reads both
    assert changes_in(long) == changes_in(frame) == len(commit.changes)
    assert without_trailing(long) == frame  # byte for byte what a peer without it gets
    assert without_trailing(frame) == frame


def test_fields_after_the_known_ones_are_ignored_and_a_bad_trace_loses_only_the_trace(tmp_path):
    s = store(tmp_path, "a")
    _, commit = commit_now(s, [("INSERT INTO t (id) VALUES (1)", ())], ts=1)
    [cs] = chunk_version(s.actor_id, 1, commit.changes, commit.last_seq, 1, 1, trace=TRACE)
    newer = msgpack.packb([*fields(encode(cs)), {"a": "field of a later version"}, 7])
    assert decode_frame(newer)[1] == cs  # 13 fields: the two unknown ones ignored
    assert without_trailing(newer) == encode(dataclasses.replace(cs, trace=None))
    for bad in (12345, "text", b"x" * 65):
        frame = msgpack.packb([*fields(encode(cs))[:10], bad], use_bin_type=True)
        decoded = decode_frame(frame)[1]
        assert decoded.trace is None and decoded.changes == cs.changes


def test_trailing_fields_go_only_to_peers_whose_metadata_accept_them(tmp_path):
    sa, sb = store(tmp_path, "a"), store(tmp_path, "b")
    ra, rb = replicator(sa, fanout=5), replicator(sb, fanout=5)
    new_actor, old_actor = b"\x01" * 16, b"\x02" * 16
    ra.member_event(member_up(encode_meta(new_actor, 0, 0), 1))
    ra.member_event(member_up(old_meta(old_actor), 2))
    assert ra.peers[new_actor].trailing and not ra.peers[old_actor].trailing
    # what an old peer reads of the new metadata is unchanged
    assert decode_meta(encode_meta(new_actor, 0, 0)) == (new_actor, 0, 0)
    assert meta_trailing_fields(old_meta(old_actor)) == 0

    statements = [("INSERT INTO t (id, body) VALUES (?, ?)", (i, "x" * 200)) for i in range(100)]
    _, commit = sa.execute_local(statements, ra.hlc.now())
    effects = ra.install_commit(commit, 0.0, trace=TRACE)
    sent = {(e.addr[1], e.data) for e in effects if isinstance(e, SendFrame)}
    to_new = [d for port, d in sent if port == 1]
    to_old = [d for port, d in sent if port == 2]
    assert len(to_new) == len(to_old) > 1  # a chunked version: every chunk carries the trace
    assert all(len(fields(d)) == 11 and fields(d)[10] == TRACE for d in to_new)
    assert all(len(fields(d)) == 10 for d in to_old)
    assert sorted(map(without_trailing, to_new)) == sorted(to_old)

    # a new peer relays what it got with the field, and cuts it for an old one
    rb.member_event(member_up(old_meta(old_actor), 2))
    rb.member_event(member_up(encode_meta(new_actor, 0, 0), 1))
    for frame in to_new:
        relayed = rb.handle_frame(None, frame, now=0.1)
        by_port = {e.addr[1]: e.data for e in relayed if isinstance(e, SendFrame)}
        assert by_port == {1: frame, 2: without_trailing(frame)}
    rb.apply_pending()
    assert table(sb) == table(sa) and rb.traces == {(sa.actor_id, 1): TRACE}


def test_a_sync_answer_carries_the_trace_only_to_a_requester_that_accepts_it(tmp_path):
    sa, sb, sc = store(tmp_path, "a"), store(tmp_path, "b"), store(tmp_path, "c")
    ra, rb, rc = replicator(sa, broadcast=False), replicator(sb), replicator(sc)
    ra.member_event(member_up(encode_meta(sb.actor_id, 0, 0), 1))  # b: a new peer
    ra.member_event(member_up(old_meta(sc.actor_id), 2))  # c: an old one
    _, commit = sa.execute_local([("INSERT INTO t (id) VALUES (5)", ())], ra.hlc.now())
    ra.install_commit(commit, 0.0, trace=TRACE)

    to_b = list(ra.serve_sync(rb.sync_request()))
    to_c = list(ra.serve_sync(rc.sync_request()))
    assert [trace_of(f) for f in to_b] == [TRACE, None]  # the changeset, then "done"
    assert [len(fields(f)) for f in to_c[:-1]] == [10]
    assert to_c[0] == without_trailing(to_b[0])
    for client, frames in ((rb, to_b), (rc, to_c)):
        for f in frames:
            client.handle_sync_frame(("a", 1), f, 0.0)
        client.apply_pending()
    assert table(sb) == table(sc) == table(sa)
    assert rb.traces == {(sa.actor_id, 1): TRACE} and rc.traces == {}


def test_the_wire_form_of_a_span_context_round_trips():
    ctx = tracing.span_context_from_bytes(TRACE)
    assert ctx is not None and ctx.trace_id == int.from_bytes(TRACE[1:17], "big")
    assert tracing.context_bytes(ctx) == TRACE
    assert tracing.span_context_from_bytes(b"\x01" + TRACE[1:]) is None  # a later version
    assert tracing.span_context_from_bytes(TRACE[:10]) is None
    assert tracing.span_context_from_bytes(b"\0" * 26) is None  # invalid ids
    unsampled = TRACE[:-1] + b"\0"
    assert tracing.context_bytes(tracing.span_context_from_bytes(unsampled)) is None


# -- configuration ---------------------------------------------------------------------------


def telemetry(value) -> Config:
    return Config.from_mapping({"db": {"path": "x.db"}, "telemetry": {"open-telemetry": value}})


def test_corrosions_two_spellings_of_open_telemetry_are_read():
    assert telemetry("from-env").open_telemetry == OpenTelemetryConfig(None)
    cfg = telemetry({"exporter": {"endpoint": "http://collector:4318"}})
    assert cfg.open_telemetry == OpenTelemetryConfig("http://collector:4318")
    assert "open-telemetry" not in " ".join(cfg.ignored)
    assert Config.from_mapping({"db": {"path": "x.db"}}).open_telemetry is None
    env = {"TELEMETRY__OPEN_TELEMETRY": "from-env"}
    loaded = Config.from_mapping(apply_env({"db": {"path": "x"}}, env))
    assert loaded.open_telemetry == OpenTelemetryConfig(None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("from_env", 'telemetry.open-telemetry: expected "from-env"'),
        ({"exporter": {"endpoint": "collector:4318"}}, "exporter.endpoint: expected the http://"),
        ({"exporter": {"endpoint": "http://x", "protocol": "grpc"}}, "telemetry.open-telemetry:"),
        ({"exporter": "http://x"}, "telemetry.open-telemetry: expected"),
    ],
)
def test_a_bad_open_telemetry_value_fails_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        telemetry(value)


def test_the_environment_turns_tracing_on_and_off_and_names_where_spans_go():
    assert tracing.resolve(None, {}) is None  # nothing configured: off
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/otlp"}
    assert tracing.resolve(None, base).endpoint == "http://c:4318/otlp/v1/traces"
    exact = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x"}
    assert tracing.resolve(None, exact).endpoint == "http://t:1/x"
    assert tracing.resolve(None, {**base, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.resolve(None, {**base, "OTEL_TRACES_EXPORTER": "none"}) is None
    key = OpenTelemetryConfig("http://c:4318")
    assert tracing.resolve(key, {}).endpoint == "http://c:4318/v1/traces"
    assert tracing.resolve(key, base).endpoint == "http://c:4318/v1/traces"  # the key wins
    assert tracing.resolve(OpenTelemetryConfig(None), {}).endpoint is None  # the default


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL=grpc: this agent"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER=zipkin: this agent exports"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER=sometimes: unknown sampler"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG=2: the ratio",
        ),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "c:4318"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="),
    ],
)
def test_a_bad_otel_variable_fails_naming_it_and_the_remedy(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tracing.resolve(OpenTelemetryConfig(None), env)


def test_an_agent_without_tracing_configured_never_loads_the_sdk(tmp_path):
    """Off costs nothing: neither the OpenTelemetry SDK nor the exporter is imported by an
    agent that runs and writes with no ``[telemetry] open-telemetry`` and no ``OTEL_*``."""
    code = f"""
import sys, anyio
from corrosion import Agent, Config
async def main():
    cfg = Config.from_mapping({{
        "db": {{"path": {str(tmp_path / "a.db")!r}}},
        "gossip": {{"addr": "127.0.0.1:0", "plaintext": True}},
    }})
    async with Agent(cfg) as agent:
        await agent.execute(["SELECT 1"])
anyio.run(main)
print(sorted({{m.split(".")[1] for m in sys.modules if m.startswith("opentelemetry.")}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    loaded = out.strip().splitlines()[-1]
    assert "sdk" not in loaded and "exporter" not in loaded, loaded
    assert "trace" in loaded  # the API is: its no-op tracer is what "off" runs
