"""corrosion's OTLP/HTTP span exporter (corrosion/runtime/otlp_export.py) and the apply span's
direct recording (``tracing.record_span``, and the apply records of ``tracing.apply_recorder``):
what they produce is what the SDK's own span lifecycle and encoder produce, spans of every
shape, and it reaches a real receiver."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from starlette.requests import Request
from starlette.responses import Response

from corrosion.core.replication import SendFrame
from corrosion.runtime import tracing
from corrosion.runtime.apply_records import APPLY_KEYS
from corrosion.runtime.otlp_export import (
    SpanExporter,
    _recorded_span,
    _span,
    encode_request,
    readable_span,
    records_group,
)
from corrosion.runtime.recorded_span import RecordedSpan
from corrosion.runtime.spans import AgentSpans
from corrosion.runtime.tracing import SCOPE
from corrosion.surfaces.http_spans import server_span

APPLY_ATTRIBUTES = {
    "corrosion.actor_id": "ab" * 16,
    "corrosion.version": 7,
    "corrosion.seqs": "0..9",
    "corrosion.changes": 10,
    "corrosion.peer": "127.0.0.1:4567",
    "corrosion.via": "broadcast",
}


def remote_parent(rng: random.Random, **kw) -> SpanContext:
    return SpanContext(rng.getrandbits(128), rng.getrandbits(64), True, TraceFlags(1), **kw)


@pytest.fixture
def exported():
    """Tracing on with an in-memory exporter: yields the function returning what it got."""
    memory = InMemorySpanExporter()
    handle = tracing.start_tracing(None, "corrosion-test", instance_id="n1", exporter=memory)
    try:

        def spans():
            assert handle.force_flush()
            return memory.get_finished_spans()

        yield spans
    finally:
        handle.shutdown()


def every_shape(rng: random.Random) -> None:
    """Spans of the shapes corrosion and an embedding application make."""
    parent = remote_parent(rng)
    tracing.record_span("corrosion.apply", parent, SpanKind.CONSUMER, 10, 20, APPLY_ATTRIBUTES)
    tracing.record_span(
        "corrosion.apply",
        remote_parent(rng),
        SpanKind.CONSUMER,
        30,
        45,
        {**APPLY_ATTRIBUTES, "corrosion.outcome": "rejected"},
        Status(StatusCode.ERROR, "schema mismatch: table kv"),
    )
    request = tracing.start_span("POST /v1/transactions", parent, SpanKind.SERVER, {"a": 1})
    request.set_attributes({"corrosion.version": 3, "corrosion.seqs": "0..0"})
    request.add_event("commit", {"corrosion.peers": ["a:1"], "corrosion.frames": 1})
    request.set_status(Status(StatusCode.ERROR))
    request.end()
    tracer = tracing.tracer()
    with tracer.start_as_current_span("corrosion.transaction") as root:
        root.set_attributes(
            {"flag": True, "off": False, "ratio": 0.25, "neg": -5, "big": 2**62, "z": -0.0}
        )
        root.add_event("commit", {"corrosion.peers": ["a:1", "b:2"], "corrosion.frames": 2})
        with tracer.start_as_current_span("child", kind=SpanKind.PRODUCER) as child:
            child.set_status(Status(StatusCode.OK))
    tracer.start_span("linked", links=[Link(parent, {"why": "carried"})]).end()
    tracer.start_span("sequence", attributes={"peers": ("a", "b"), "blob": "é" * 100}).end()
    tracer.start_span("holes", attributes={"peers": ("a", None)}).end()
    stated = remote_parent(rng, trace_state=TraceState([("vendor", "x")]))
    tracer.start_span("stated", context=set_span_in_context(NonRecordingSpan(stated))).end()
    tracing.tracer("orchestrator").start_span("corrosion.run", kind=SpanKind.SERVER).end()


def test_the_request_is_the_sdk_encoders_for_spans_of_every_shape(exported):
    every_shape(random.Random(3))
    spans = exported()
    assert len(spans) == 10
    # the direct encoding did all but the spans it leaves to the SDK's encoder
    assert [s.name for s in spans if _span(s) is None] == ["linked", "holes", "stated"]
    ours = ExportTraceServiceRequest.FromString(encode_request(spans))
    assert ours == encode_spans(spans)
    assert ours.SerializeToString(deterministic=True) == encode_spans(spans).SerializeToString(
        deterministic=True
    )
    scopes = [s.scope.name for r in ours.resource_spans for s in r.scope_spans]
    assert scopes == ["corrosion", "orchestrator"]


def test_a_recorded_span_is_the_span_the_sdk_makes(exported):
    rng = random.Random(5)
    parent = remote_parent(rng)
    tracing.record_span("corrosion.apply", parent, SpanKind.CONSUMER, 100, 250, APPLY_ATTRIBUTES)
    span = tracing.tracer().start_span(
        "corrosion.apply",
        context=set_span_in_context(NonRecordingSpan(parent)),
        kind=SpanKind.CONSUMER,
        start_time=100,
        attributes=APPLY_ATTRIBUTES,
    )
    span.end(end_time=250)
    recorded, made = exported()
    for field in ("name", "kind", "start_time", "end_time", "resource", "instrumentation_scope"):
        assert getattr(recorded, field) == getattr(made, field), field
    assert dict(recorded.attributes) == dict(made.attributes)
    assert recorded.parent == made.parent == parent
    assert recorded.context.trace_id == made.context.trace_id == parent.trace_id
    assert recorded.context.trace_flags == made.context.trace_flags
    assert not recorded.context.is_remote
    assert recorded.context.span_id not in (made.context.span_id, parent.span_id)
    assert recorded.status.status_code is StatusCode.UNSET


REQUEST = {"http.request.method": "POST", "http.route": "/v1/transactions"}
ODD = object()  # not an attribute value: the SDK drops or converts it


@contextmanager
def started(parent: SpanContext | None) -> Iterator[Span]:
    """A request span through ``tracing.start_span``, as corrosion's HTTP server makes it."""
    span = tracing.start_span("POST /v1/transactions", parent, SpanKind.SERVER, REQUEST)
    with tracing.current(span), span:
        yield span


def made_by_the_sdk_and_by_start_span(parent: SpanContext | None) -> list[Span]:
    """The same request span's life (failing) through the SDK and ``tracing.start_span``."""
    sdk = tracing.tracer().start_as_current_span(
        "POST /v1/transactions",
        context=set_span_in_context(NonRecordingSpan(parent)) if parent else None,
        kind=SpanKind.SERVER,
        attributes=REQUEST,
    )
    made = []
    for start in (sdk, started(parent)):
        with pytest.raises(KeyError), start as span:
            made.append(span)
            with tracing.tracer().start_as_current_span("inside"):
                pass
            assert span.is_recording()
            span.set_attributes({"corrosion.version": 3, "bad": object(), "": 1, "list": [1, 2]})
            span.set_attribute("http.response.status_code", 500)
            span.add_event("commit", {"corrosion.peers": ["a:1", "b:2"], "corrosion.frames": 2})
            span.add_event("odd", {"none": None, "object": ODD, "mixed": [1, "a"], "t": (1,)})
            span.set_status(StatusCode.UNSET)
            span.update_name("POST /v1/transactions!")
            raise KeyError("failed")
        assert not span.is_recording()
    return made


@pytest.mark.parametrize("remote", [True, False])
def test_a_started_span_is_the_span_the_sdk_makes(exported, remote):
    parent = remote_parent(random.Random(7)) if remote else None
    ours = made_by_the_sdk_and_by_start_span(parent)[1]
    assert isinstance(ours, tracing.RecordedSpan)
    spans = exported()
    inside_sdk, made, inside_ours, recorded = spans
    for field in ("name", "kind", "resource", "instrumentation_scope", "parent"):
        assert getattr(recorded, field) == getattr(made, field), field
    assert dict(recorded.attributes) == dict(made.attributes)
    assert recorded.status.status_code is made.status.status_code is StatusCode.ERROR
    assert recorded.status.description == made.status.description == "KeyError: 'failed'"
    assert [e.name for e in recorded.events] == [e.name for e in made.events]
    for ours_event, sdk_event in zip(recorded.events[:2], made.events[:2], strict=True):
        assert dict(ours_event.attributes) == dict(sdk_event.attributes)
    exception = dict(recorded.events[2].attributes)
    assert exception.keys() == dict(made.events[2].attributes).keys()
    assert exception["exception.type"] == "KeyError" and exception["exception.escaped"] == "True"
    assert recorded.context.trace_flags == made.context.trace_flags
    if remote:
        assert recorded.context.trace_id == made.context.trace_id == parent.trace_id
    else:
        assert recorded.parent is None and recorded.context.trace_id != made.context.trace_id
    # the span was current within its block: a span made there is its child
    assert inside_sdk.parent.span_id == made.context.span_id
    assert inside_ours.parent.span_id == recorded.context.span_id
    assert recorded.start_time <= recorded.end_time
    ours_encoded = ExportTraceServiceRequest.FromString(encode_request([recorded]))
    assert ours_encoded == encode_spans([recorded])


def test_a_started_span_follows_the_sampling_of_its_parent(exported):
    rng = random.Random(17)
    unsampled = SpanContext(rng.getrandbits(128), rng.getrandbits(64), True, TraceFlags(0))
    span = tracing.start_span("POST /v1/transactions", unsampled, SpanKind.SERVER, {})
    assert not span.is_recording()
    assert span.get_span_context().trace_id == unsampled.trace_id
    assert tracing.context_bytes(span) is None  # nothing for the changesets to carry
    span.end()
    assert exported() == ()


def test_a_parent_not_sampled_records_nothing(exported):
    rng = random.Random(9)
    unsampled = SpanContext(rng.getrandbits(128), rng.getrandbits(64), True, TraceFlags(0))
    tracing.record_span("corrosion.apply", unsampled, SpanKind.CONSUMER, 1, 2, APPLY_ATTRIBUTES)
    assert exported() == ()


def spans_of_every_shape(seed: int) -> list[Any]:
    """Finished spans of every shape, as the SDK hands them to an exporter."""
    memory = InMemorySpanExporter()
    handle = tracing.start_tracing(None, "corrosion-test", instance_id="n1", exporter=memory)
    try:
        every_shape(random.Random(seed))
        assert handle.force_flush()
        return list(memory.get_finished_spans())
    finally:
        handle.shutdown()


def test_the_exporter_delivers_the_spans_to_a_receiver(otlp_receiver):
    exporter = SpanExporter(endpoint=otlp_receiver.traces_url)
    spans = spans_of_every_shape(11)
    assert exporter.export(spans).name == "SUCCESS"
    exporter.shutdown()
    otlp_receiver.wait_for_sync(lambda s: len(s) >= len(spans), what="the exported spans")
    got = otlp_receiver.snapshot()
    assert sorted(s.name for s in got) == sorted(s.name for s in spans)
    apply = next(s for s in got if s.attributes.get("corrosion.outcome") == "rejected")
    assert apply.attributes["corrosion.version"] == 7
    assert apply.kind == 5  # consumer
    assert {s.service for s in got} == {"corrosion-test"}


def test_a_collector_refusing_exports_is_logged_once_and_its_recovery_once(otlp_receiver, caplog):
    """Not a WARNING per retry and an ERROR per batch from the SDK's exporter while the collector
    is down (every few seconds): one WARNING when exports start failing, one INFO when they
    work again."""
    spans = spans_of_every_shape(12)
    exporter = SpanExporter(endpoint=otlp_receiver.traces_url)
    caplog.set_level(logging.DEBUG)
    otlp_receiver.refusing = 401
    assert [exporter.export(spans).name for _ in range(3)] == ["FAILURE"] * 3
    otlp_receiver.refusing = 0
    assert exporter.export(spans).name == "SUCCESS"
    exporter.shutdown()
    loud = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno > 10]
    assert loud == [
        (
            "corrosion.tracing",
            "WARNING",
            f"tracing: cannot export spans to the OTLP collector at {otlp_receiver.traces_url} "
            "(HTTP 401): their batches are dropped until it answers "
            "(an INFO line says when it does)",
        ),
        (
            "corrosion.tracing",
            "INFO",
            f"tracing: the OTLP collector at {otlp_receiver.traces_url} takes spans again "
            "(3 exports failed before)",
        ),
    ]
    assert any("Failed to export" in r.getMessage() for r in caplog.records)  # now DEBUG
    otlp_receiver.wait_for_sync(lambda s: len(s) >= len(spans), what="the spans")


@pytest.mark.parametrize(
    ("sampler", "kept"),
    [("parentbased_traceidratio", True), ("parentbased_always_off", True), ("traceidratio", False)],
)
def test_a_recorded_span_follows_the_configured_sampler(monkeypatch, sampler, kept):
    """A parent-based sampler keeps the child of a sampled parent whatever its root sampler;
    another is asked (a ratio of 0 keeps nothing)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    memory = InMemorySpanExporter()
    handle = tracing.start_tracing(None, "corrosion-test", exporter=memory)
    try:
        rng = random.Random(13)
        tracing.record_span(
            "corrosion.apply", remote_parent(rng), SpanKind.CONSUMER, 1, 2, APPLY_ATTRIBUTES
        )
        assert handle.force_flush()
        assert len(memory.get_finished_spans()) == (1 if kept else 0)
    finally:
        handle.shutdown()


def test_the_exporter_honours_the_proxy_environment_it_read_at_start(otlp_receiver, monkeypatch):
    """The session's environment (proxy, NO_PROXY, CA bundle, netrc) is read once, when the
    exporter is made: an HTTP proxy named then still carries every export."""
    monkeypatch.setenv("HTTP_PROXY", otlp_receiver.url)  # the receiver stands in for a proxy
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    exporter = SpanExporter(endpoint="http://collector.invalid:4318/v1/traces")
    monkeypatch.delenv("HTTP_PROXY")
    try:
        for _ in range(2):
            exporter.export([])  # an empty request: the proxy sees the collector's full URL
    finally:
        exporter.shutdown()
    # a proxied request's path is the absolute URL, which the receiver rejects (counted)
    otlp_receiver.wait_for_sync(lambda _spans: otlp_receiver.rejected >= 2, what="2 requests")


# -- apply records (``tracing.apply_recorder``): a tuple per applied version, encoded by the
# exporter as the span ``tracing.record_span`` makes


def apply_record(rng: random.Random, version: int = 7, flags: int = 1, **kw) -> tuple:
    """An apply record of APPLY_ATTRIBUTES' values, its parent a fresh wire context."""
    context = kw.pop("context", b"\0" + rng.randbytes(24) + bytes((flags,)))
    values = {**APPLY_ATTRIBUTES, "corrosion.version": version, **kw}
    assert tuple(values) == APPLY_KEYS
    return (context, 1_000_000_123, 1_000_250_456, *values.values())


@pytest.mark.parametrize("version", [0, 7, 300, 2**21 + 5, 2**40, 2**63 - 1])
def test_an_apply_record_is_encoded_as_the_span_record_span_makes(exported, version):
    rng = random.Random(version)
    record = apply_record(rng, version, flags=3)  # sampled, random trace id
    context, start, end, *values = record
    parent = tracing.span_context_from_bytes(context)
    attributes = dict(zip(APPLY_KEYS, values, strict=True))
    tracing.record_span("corrosion.apply", parent, SpanKind.CONSUMER, start, end, attributes)
    (made,) = exported()
    group = records_group(made.resource, made.instrumentation_scope)
    ours = ExportTraceServiceRequest.FromString(encode_request([record], group))
    sdk = encode_spans([made])
    ours_span = ours.resource_spans[0].scope_spans[0].spans[0]
    # the span id is the exporter's to make, random as the SDK's: the rest is the same span
    assert len(ours_span.span_id) == 8 and ours_span.span_id not in (bytes(8), context[17:25])
    ours_span.span_id = sdk.resource_spans[0].scope_spans[0].spans[0].span_id
    assert ours == sdk
    assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)
    # the SDK's encoder, for an exporter without corrosion's, gets the same span
    readable = readable_span(
        record, made.context.span_id, made.resource, made.instrumentation_scope
    )
    assert encode_spans([readable]) == sdk


def test_apply_records_among_spans_are_grouped_as_the_sdks_encoder_groups_them(exported):
    rng = random.Random(21)
    every_shape(rng)
    spans = list(exported())
    records = [apply_record(rng, v) for v in (1, 2, 3)]
    group = records_group(spans[0].resource, spans[0].instrumentation_scope)
    ours = ExportTraceServiceRequest.FromString(
        encode_request([records[0], *spans[:3], records[1], *spans[3:], records[2]], group)
    )
    # the SDK's encoding of the same, the records made the spans record_span makes (span id 1)
    made = [readable_span(r, 1, *group[:2]) for r in records]
    expected = encode_spans([made[0], *spans[:3], made[1], *spans[3:], made[2]])
    ours_spans = [s for r in ours.resource_spans for ss in r.scope_spans for s in ss.spans]
    expected_spans = [s for r in expected.resource_spans for ss in r.scope_spans for s in ss.spans]
    assert len(ours_spans) == len(expected_spans) == len(spans) + 3
    for ours_span, expected_span in zip(ours_spans, expected_spans, strict=True):
        if expected_span.span_id == (1).to_bytes(8, "big"):  # a record's: the exporter's id
            ours_span.span_id = expected_span.span_id
    assert ours == expected
    assert [s.scope.name for r in ours.resource_spans for s in r.scope_spans] == [
        SCOPE,
        "orchestrator",
    ]


def test_apply_records_reach_a_receiver_and_those_with_no_valid_sampled_context_do_not(
    otlp_receiver,
):
    settings = tracing.resolve(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url})
    handle = tracing.start_tracing(settings, "corrosion-test", instance_id="n1")
    try:
        queue_records = tracing.apply_recorder()
        assert queue_records is not None  # corrosion's exporter, the default sampler
        rng = random.Random(23)
        kept = apply_record(rng, 11)
        queue_records(
            [
                kept,
                apply_record(rng, 12, flags=0),  # not sampled
                apply_record(rng, 13, context=b"\0" + bytes(24) + b"\1"),  # no ids
                apply_record(rng, 14, context=b"\1" + rng.randbytes(24) + b"\1"),  # newer
                apply_record(rng, 15, context=b"\0" + rng.randbytes(10)),  # short
            ]
        )
        tracing.record_span(  # a span made the general way, beside them
            "corrosion.apply", remote_parent(rng), SpanKind.CONSUMER, 1, 2, APPLY_ATTRIBUTES
        )
        assert handle.force_flush()
    finally:
        handle.shutdown()
    otlp_receiver.wait_for_sync(lambda s: len(s) >= 2, what="the apply spans")
    got = {s.attributes["corrosion.version"]: s for s in otlp_receiver.snapshot()}
    assert sorted(got) == [7, 11]
    span = got[11]
    assert (span.name, span.kind) == ("corrosion.apply", 5)  # consumer
    assert span.trace_id == kept[0][1:17].hex() and span.parent_id == kept[0][17:25].hex()
    assert (span.start_ns, span.end_ns) == (kept[1], kept[2])
    assert span.attributes == dict(zip(APPLY_KEYS, kept[3:], strict=True))
    assert (span.service, span.instance) == ("corrosion-test", "n1")


class KeepingExporter(SpanExporter):
    """corrosion's exporter keeping what it is given (records and spans) instead of sending."""

    def __init__(self) -> None:
        super().__init__(endpoint="http://127.0.0.1:9/v1/traces")
        self.got: list = []

    def export(self, spans):
        self.got.extend(spans)
        return SpanExportResult.SUCCESS


class BlockingExporter(KeepingExporter):
    """A ``KeepingExporter`` whose first export waits to be released."""

    def __init__(self) -> None:
        super().__init__()
        self.exporting = threading.Event()
        self.release = threading.Event()

    def export(self, spans):
        self.exporting.set()
        assert self.release.wait(30)
        return super().export(spans)


def test_apply_records_beyond_the_queue_are_dropped_and_counted_as_spans_are(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100000000")
    exporter = BlockingExporter()
    handle = tracing.start_tracing(None, "corrosion-test", exporter=exporter)
    try:
        queue_records = tracing.apply_recorder()
        assert queue_records is not None
        rng = random.Random(29)
        queue_records([apply_record(rng, v) for v in range(4)])  # a batch: the export starts
        assert exporter.exporting.wait(30)
        queue_records([apply_record(rng, v) for v in range(4, 10)])  # 6 for 4 places
        exporter.release.set()
        assert handle.force_flush()
    finally:
        exporter.release.set()
        handle.shutdown()
    # the oldest two of the second lot were dropped, with the batch processor's warning (its
    # logger says it once)
    assert sorted(r[4] for r in exporter.got) == [0, 1, 2, 3, 6, 7, 8, 9]
    assert "Queue full, dropping Span." in [r.message for r in caplog.records]


# -- request spans (``tracing.start_span`` with corrosion's exporter): the live span itself is
# queued when it ends, and the exporter encodes it as the SDK's encoder does its ReadableSpan

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PEERS = [SendFrame(("10.0.0.3", 4001), b"x"), SendFrame(("10.0.0.2", 4001), b"y")]


@pytest.fixture
def kept():
    """Tracing on with corrosion's exporter keeping what it gets: yields that exporter and
    a function returning what it got so far."""
    exporter = KeepingExporter()
    handle = tracing.start_tracing(None, "corrosion-test", instance_id="n1", exporter=exporter)
    try:

        def got():
            assert handle.force_flush()
            return list(exporter.got)

        yield exporter, got
    finally:
        handle.shutdown()


async def serve(
    headers: dict[str, str], status: int = 200, *, fail: bool = False
) -> tuple[bytes | None, Span | None]:
    """One ``POST /v1/transactions`` through corrosion's server span (``http_spans``), its
    transaction described by the runtime's ``AgentSpans`` as for a real commit of 3 changes
    broadcast to two peers; returns the context the version's changesets would carry and the
    span the transaction was described on (the request's)."""
    carried = []
    spans = AgentSpans(bytes(range(16)))

    async def endpoint(_request: Request) -> Response:
        with spans.transaction() as span:
            commit = SimpleNamespace(version=2**33 + 5, last_seq=2, changes=[1, 2, 3])
            carried.append((spans.committed(span, commit), span))  # type: ignore[arg-type]
            spans.broadcast(span, commit, PEERS)  # type: ignore[arg-type]
        if fail:
            raise KeyError("failed")
        return Response(status_code=status)

    traced = server_span("POST", "/v1/transactions", transaction=True)(endpoint)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/transactions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    if fail:
        with pytest.raises(KeyError):
            await traced(Request(scope))
    else:
        assert (await traced(Request(scope))).status_code == status
    return carried[0]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "status", "fail"),
    [
        ({}, 200, False),  # a root
        ({"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}, 200, False),
        ({"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-03"}, 200, False),  # random trace id
        ({}, 503, False),
        ({"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}, 200, True),  # raised
    ],
)
async def test_a_request_span_is_encoded_as_the_sdk_encodes_the_span_it_stands_for(
    kept, headers, status, fail
):
    exporter, got = kept
    carried, request = await serve(headers, status, fail=fail)
    assert isinstance(request, RecordedSpan)
    # queued as its Span message, made as it ended (no ReadableSpan, nothing for the GC)
    assert got() == [_recorded_span(request)]
    ours = ExportTraceServiceRequest.FromString(encode_request(got(), exporter._records))
    sdk = encode_spans([request.readable()])  # the SDK's encoding of the span it stands for
    assert ours == sdk
    assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)
    # what the request span says
    (resource_spans,) = ours.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == SCOPE
    (span,) = scope_spans.spans
    assert (span.name, span.kind) == ("POST /v1/transactions", 2)  # server
    if "traceparent" in headers:
        assert (span.trace_id.hex(), span.parent_span_id.hex()) == (CLIENT_TRACE, CLIENT_SPAN)
        assert span.flags == 0x300  # its parent is remote
    else:
        assert span.parent_span_id == b"" and span.flags == 0x100
    attributes = {kv.key: kv.value for kv in span.attributes}
    assert attributes["corrosion.actor_id"].string_value == bytes(range(16)).hex()
    assert attributes["corrosion.version"].int_value == 2**33 + 5
    assert attributes["corrosion.seqs"].string_value == "0..2"
    assert attributes["corrosion.changes"].int_value == 3
    assert attributes["http.route"].string_value == "/v1/transactions"
    assert attributes["http.request.method"].string_value == "POST"
    assert ("http.response.status_code" in attributes) is not fail
    commit = span.events[0]
    assert commit.name == "commit"
    peers = {kv.key: kv.value for kv in commit.attributes}["corrosion.peers"]
    assert [v.string_value for v in peers.array_value.values] == ["10.0.0.2:4001", "10.0.0.3:4001"]
    if fail:
        assert [e.name for e in span.events] == ["commit", "exception"]
        assert (span.status.code, span.status.message) == (2, "KeyError: 'failed'")
    else:
        assert span.status.code == (2 if status >= 500 else 0)
    # the version's changesets carry the request span's context
    flags = int(headers["traceparent"][-2:], 16) if "traceparent" in headers else 3  # random
    assert carried == b"\0" + span.trace_id + span.span_id + bytes((flags,))


@pytest.mark.anyio
async def test_an_unsampled_requests_span_is_not_recorded_and_its_version_carries_nothing(kept):
    _exporter, got = kept
    carried, span = await serve({"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert (carried, span) == (None, None)  # the transaction is not described either
    assert got() == []


@pytest.mark.anyio
async def test_a_request_span_of_another_shape_is_left_to_the_sdks_encoder(kept):
    """A trace state, a link, an event attribute the SDK cleans: the exporter asks the SDK's
    encoder for that span (its ReadableSpan), among records it encodes itself: such a span
    is queued as it is, not encoded as it ends."""
    exporter, got = kept
    _carried, stated = await serve(
        {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "v=x"}
    )
    linked = tracing.start_span("linked", None, SpanKind.SERVER, {"a": [1, 2]})
    linked.add_link(remote_parent(random.Random(31)), {"why": "carried"})
    linked.end()
    odd = tracing.start_span("odd", None, SpanKind.SERVER, {})
    odd.add_event("odd", {"none": None, "t": (1,)})
    odd.end()
    _carried, plain = await serve({})
    spans = got()
    assert spans[:3] == [stated, linked, odd] and all(_recorded_span(s) is None for s in spans[:3])
    assert spans[3] == _recorded_span(plain)  # the usual shape, encoded as it ended
    rng = random.Random(37)
    records = [apply_record(rng, 1), *spans[:2], apply_record(rng, 2), *spans[2:]]
    ours = ExportTraceServiceRequest.FromString(encode_request(records, exporter._records))
    readable = [stated.readable(), linked.readable(), odd.readable(), plain.readable()]
    group = exporter._records[:2]
    sdk = encode_spans(
        [readable_span(records[0], 0, *group), *readable[:2], readable_span(records[3], 0, *group)]
        + readable[2:]
    )
    ours_spans = [s for r in ours.resource_spans for ss in r.scope_spans for s in ss.spans]
    sdk_spans = [s for r in sdk.resource_spans for ss in r.scope_spans for s in ss.spans]
    assert len(ours_spans) == len(sdk_spans) == 6
    for place in (0, 3):  # the apply records' span ids are the exporter's to make
        ours_spans[place].span_id = sdk_spans[place].span_id
    assert ours == sdk
    assert ours_spans[1].trace_state == "v=x"
    assert [len(s.links) for s in ours_spans] == [0, 0, 1, 0, 0, 0]


def test_request_spans_reach_a_receiver(otlp_receiver):
    settings = tracing.resolve(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url})
    handle = tracing.start_tracing(settings, "corrosion-test", instance_id="n1")
    try:
        anyio.run(serve, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        anyio.run(serve, {}, 500)
        assert handle.force_flush()
    finally:
        handle.shutdown()
    otlp_receiver.wait_for_sync(lambda s: len(s) >= 2, what="the request spans")
    child, root = otlp_receiver.snapshot()
    assert (child.trace_id, child.parent_id) == (CLIENT_TRACE, CLIENT_SPAN)
    assert root.parent_id is None and root.trace_id != CLIENT_TRACE
    for span, status in ((child, 200), (root, 500)):
        assert (span.name, span.kind, span.scope) == ("POST /v1/transactions", 2, SCOPE)
        assert span.attributes["http.response.status_code"] == status
        assert span.attributes["corrosion.version"] == 2**33 + 5
        assert span.events == [
            (
                "commit",
                {"corrosion.peers": ["10.0.0.2:4001", "10.0.0.3:4001"], "corrosion.frames": 2},
            )
        ]
        assert (span.service, span.instance) == ("corrosion-test", "n1")
        assert span.start_ns <= span.end_ns
    assert (child.status, root.status) == (0, 2)
