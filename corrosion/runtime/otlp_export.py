"""The OTLP/HTTP span exporter corrosion installs: the SDK's, with a cheaper encoding of the
spans it exports most (one ``corrosion.apply`` per version applied, one server span per
``POST /v1/transactions``).

The SDK's encoder builds a protobuf object per span, attribute and value (~30 µs of CPU per
apply span, on the exporter's thread but under the GIL: a fifth of the apply it describes).
``encode_request`` writes the same bytes straight from the span for the usual shape
(attributes of scalars or tuples of them, events, no links: every apply and request span),
~8 µs, and asks the SDK's encoder for anything else, and for the resource and scope once per
batch. tests/agent/test_otlp_export.py holds it byte for byte equal to the SDK's encoding.

Imported only when tracing starts (``tracing._new_provider``): it imports the SDK.
"""

from __future__ import annotations

import logging
import operator
import random
import struct
from collections.abc import Sequence
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .apply_records import (
    APPLY_KEYS,
    APPLY_KIND,
    APPLY_SPAN,
    CONTEXT_BYTES,
    WIRE_CONTEXT,
    ApplyRecord,
)
from .recorded_span import NO_TRACE_STATE, RecordedSpan

log = logging.getLogger("corrosion.tracing")

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_INT64 = range(-(2**63), 2**63)
_M64 = 0xFFFF_FFFF_FFFF_FFFF
# a span's first fields in one pack: trace id (1), span id (2) and, with a parent, its id (4)
_IDS = struct.Struct(">HQQHQ").pack
_IDS_PARENT = struct.Struct(">HQQHQHQ").pack
_TIMES = struct.Struct("<BQBQ").pack  # start (7) and end (8), fixed64
_BYTE = [bytes((i,)) for i in range(0x80)]  # one-byte varints: most lengths and small ints
# Span.flags (field 16, fixed32): "has is_remote", and "is remote" when the parent is
_FLAGS_LOCAL_PARENT = b"\x85\x01" + _FIXED32(0x100)
_FLAGS_REMOTE_PARENT = b"\x85\x01" + _FIXED32(0x300)
_CACHED = 4096  # entries in each of the caches below (they are cleared when full)
_getrandbits = random.getrandbits  # span ids, as the SDK's RandomIdGenerator makes them


class CachedHashResource(Resource):
    """The provider's resource, its hash computed once: the SDK's encoder groups spans by
    resource and hashes it per span (a JSON dump of every resource attribute, ~6 µs)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if n < 0x80:
        return _BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0x20_0000:  # versions, most of them
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    n = len(payload)
    return tag + (_BYTE[n] if n < 0x80 else _varint(n)) + payload


# Encoded attributes, by field tag then key and value: the string ones repeat from span to
# span (actor, seqs, peer, via; an event's peers, a tuple of strings), and the small integers.
# Other integers are encoded on the fly after their key, which is encoded once (``_int_keys``).
_str_attributes: dict[bytes, dict[tuple[str, Any], bytes]] = {b"\x4a": {}, b"\x1a": {}}
_small_ints: dict[bytes, dict[tuple[str, int], bytes]] = {b"\x4a": {}, b"\x1a": {}}
_int_keys: dict[str, bytes] = {}  # key -> its KeyValue.key field and the value's tag
_SCALARS = (str, int, bool, float)


def _scalar(value: Any) -> bytes | None:
    """An AnyValue of a str, int, bool or float; None for anything else."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is int:
        return b"\x18" + _varint(value & _M64) if value in _INT64 else None
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    return None


def _key_value(tag: bytes, key: str, value: Any) -> bytes | None:
    """A KeyValue field ``tag``: a scalar or a tuple of scalars (the SDK's attribute values);
    None for anything else (the SDK's encoder does those)."""
    kind = type(value)
    if kind is str:
        cache = _str_attributes[tag]
        found = cache.get((key, value))
        if found is None:
            found = _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", _scalar(value)))  # type: ignore[arg-type]
            if len(cache) >= _CACHED:
                cache.clear()
            cache[key, value] = found
        return found
    if kind is int and -0x8000_0000_0000_0000 <= value < 0x8000_0000_0000_0000:
        small = 0 <= value < 0x400  # counts repeat (changes, frames); ids and versions do not
        if small:
            found = _small_ints[tag].get((key, value))
            if found is not None:
                return found
        prefix = _int_keys.get(key)
        if prefix is None:
            if len(_int_keys) >= _CACHED:
                _int_keys.clear()
            prefix = _int_keys[key] = _field(b"\x0a", key.encode()) + b"\x12"
        number = _varint(value & _M64)
        size = len(number) + 1  # the AnyValue: int_value's tag and the varint
        encoded = b"".join(
            (tag, _varint(len(prefix) + 1 + size), prefix, _BYTE[size], b"\x18", number)
        )
        if small:
            if len(_small_ints[tag]) >= _CACHED:
                _small_ints[tag].clear()
            _small_ints[tag][key, value] = encoded
        return encoded
    if kind in _SCALARS:
        any_value = _scalar(value)
    elif kind is tuple:
        items = [_scalar(v) for v in value]
        if None in items:
            return None
        any_value = _field(b"\x2a", b"".join(_field(b"\x0a", v) for v in items))  # type: ignore[arg-type]
    else:
        return None
    if any_value is None:
        return None
    encoded = _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", any_value))
    if kind is tuple and all(type(v) is str for v in value):  # (True,) == (1,): strings only
        cache = _str_attributes[tag]
        if len(cache) >= _CACHED:
            cache.clear()
        cache[key, value] = encoded
    return encoded


def _attributes(tag: bytes, attributes: Any, parts: list[bytes]) -> bool:
    """Append the KeyValue fields ``tag`` of ``attributes`` to ``parts``; False when one is of
    a type ``_key_value`` does not do."""
    if attributes:
        strings = _str_attributes[tag]
        small_ints = _small_ints[tag]
        append = parts.append
        for item in attributes.items():
            # most are a string or a small integer seen before: their encoding is cached
            kind = type(item[1])
            if kind is str or kind is tuple:
                encoded = strings.get(item)
            elif kind is int:
                encoded = small_ints.get(item)
            else:
                encoded = None
            if encoded is None:
                encoded = _key_value(tag, *item)
                if encoded is None:
                    return False
            append(encoded)
    return True


def _event(event: Any) -> bytes | None:
    """A Span.Event message, or None when an attribute is not of a type ``_key_value`` does."""
    if event.dropped_attributes:
        return None
    return _event_message(event.name, event.attributes, event.timestamp)


def _event_message(name: str, attributes: Any, timestamp: int) -> bytes | None:
    parts = [b"\x09" + _FIXED64(timestamp)] if timestamp else []
    if name:
        parts.append(_field(b"\x12", name.encode()))
    if not _attributes(b"\x1a", attributes, parts):
        return None
    return b"".join(parts)


_names: dict[str, tuple[Any, bytes]] = {}  # name -> a kind, and the name (5) and kind (6) fields


# A ReadableSpan's fields, read from its ``__dict__`` (a property call each, otherwise) when
# this SDK keeps them under these names
_FIELDS = (
    "_name",
    "_context",
    "_parent",
    "_kind",
    "_start_time",
    "_end_time",
    "_attributes",
    "_events",
    "_links",
    "_status",
)
_DIRECT = {*_FIELDS, "_resource", "_instrumentation_scope"} <= vars(ReadableSpan("probe")).keys()
_fields = operator.itemgetter(*_FIELDS)
_resource_scope = operator.itemgetter("_resource", "_instrumentation_scope")
_statuses: dict[int, tuple[Status, bytes, bytes]] = {}  # id -> a Status, its encodings


def _span(span: ReadableSpan) -> bytes | None:
    """The Span message, or None when it is not of the plain shape: links, a trace state,
    something dropped, an attribute value ``_key_value`` does not do."""
    if _DIRECT and type(span) is ReadableSpan:
        name, context, parent, kind, start, end, attributes, events, links, status = _fields(
            span.__dict__
        )
    else:
        name, context, parent, kind = span.name, span.context, span.parent, span.kind
        start, end = span.start_time, span.end_time
        attributes, events, links, status = span.attributes, span.events, span.links, span.status
    if links or (type(attributes) is not dict and span.dropped_attributes):
        return None
    if type(events) is not tuple and span.dropped_events:
        return None
    if type(links) is not tuple and span.dropped_links:
        return None
    if context is None or context[4]:  # (trace_state) SpanContext is a tuple
        return None
    encoded_events = []
    for event in events:
        encoded = _event(event)
        if encoded is None:
            return None
        encoded_events.append(encoded)
    return _message(name, context, parent, kind, start, end, attributes, encoded_events, status)


def _recorded_span(span: RecordedSpan) -> bytes | None:
    """The Span message of an ended ``RecordedSpan``: what ``_span`` writes for its
    ``ReadableSpan`` (``span.readable()``), or None when that one is not of the plain shape."""
    context = span.context
    trace_state = context[4]
    if span.links or (trace_state is not NO_TRACE_STATE and trace_state):
        return None
    events = []
    for name, attributes, timestamp in span.events:
        # an event's attributes are a dict unless cleaned by BoundedAttributes (odd values)
        encoded = _event_message(name, attributes, timestamp) if type(attributes) is dict else None
        if encoded is None:
            return None
        events.append(encoded)
    return _message(
        span.name,
        context,
        span.parent,
        span.kind,
        span.start_ns,
        span.end_ns,
        span.attributes,
        events,
        span.status,
    )


def ended_span(span: RecordedSpan) -> bytes | RecordedSpan:
    """What corrosion's exporter is given for an ended request span: its Span message, made
    as it ends (bytes, which the garbage collector never scans, where the span and its
    containers would wait in the queue for the export and be scanned and promoted meanwhile),
    or the span itself when the SDK's encoder is to encode it."""
    encoded = _recorded_span(span)
    return encoded if encoded is not None else span


def _message(
    name: str,
    context: SpanContext,
    parent: SpanContext | None,
    kind: SpanKind,
    start: int,
    end: int,
    attributes: Any,
    events: list[bytes],
    status: Status,
) -> bytes | None:
    """The Span message of these fields (``events``: the Event messages), or None when an
    attribute value is not of a type ``_key_value`` does."""
    trace_id = context[0]
    if parent is not None:
        ids = _IDS_PARENT(
            0x0A10, trace_id >> 64, trace_id & _M64, 0x1208, context[1], 0x2208, parent[1]
        )
    else:
        ids = _IDS(0x0A10, trace_id >> 64, trace_id & _M64, 0x1208, context[1])
    cached = _names.get(name)  # by name alone: hashing an enum member is a Python call
    if cached is not None and cached[0] is kind:
        head = cached[1]
    else:
        if len(_names) >= _CACHED:
            _names.clear()
        # the API's kinds count from 0, OTLP's from 1 (0 is unspecified)
        head = _field(b"\x2a", name.encode()) + b"\x30" + _BYTE[kind.value + 1]
        _names[name] = (kind, head)
    parts = [ids, head]
    if start and end:
        parts.append(_TIMES(0x39, start, 0x41, end))
    else:
        if start:
            parts.append(b"\x39" + _FIXED64(start))
        if end:
            parts.append(b"\x41" + _FIXED64(end))
    if not _attributes(b"\x4a", attributes, parts):
        return None
    for event in events:
        parts.append(_field(b"\x5a", event))
    known = _statuses.get(id(status))
    if known is None or known[0] is not status:
        known = _status(status)
    parts.append(known[2] if parent is not None and parent[2] else known[1])  # is_remote
    return b"".join(parts)


def _status(status: Status) -> tuple[Status, bytes, bytes]:
    """The Status field (15) and the flags (16) after it, for a local and a remote parent;
    remembered by the status' identity (most spans share the SDK's or the recorder's)."""
    code, message = status.status_code, status.description
    encoded = _field(
        b"\x7a",
        (_field(b"\x12", message.encode()) if message else b"")
        + (b"\x18" + _BYTE[code.value] if code is not StatusCode.UNSET else b""),
    )
    known = (status, encoded + _FLAGS_LOCAL_PARENT, encoded + _FLAGS_REMOTE_PARENT)
    if len(_statuses) >= 64:
        _statuses.clear()
    _statuses[id(status)] = known  # it holds the status: the id is not reused while here
    return known


# -- apply records (``apply_records``) -----------------------------------------------------------

_WIRE = WIRE_CONTEXT.unpack_from
_APPLY_HEAD = _field(b"\x2a", APPLY_SPAN.encode()) + b"\x30" + _BYTE[APPLY_KIND.value + 1]
_APPLY_TAIL = b"\x7a\x00" + _FLAGS_REMOTE_PARENT  # status unset; the parent is remote
# each attribute's KeyValue by value (the key is the attribute's place), as ``_key_value``
# encodes it: the strings and the change counts repeat from version to version
_apply_values: list[dict[Any, bytes]] = [{} for _ in APPLY_KEYS]
_actor_values, _, _seqs_values, _changes_values, _peer_values, _via_values = _apply_values


def _version_prefixes() -> list[bytes]:
    """The version attribute's KeyValue up to its varint, by the varint's length (1-9)."""
    key = _field(b"\x0a", APPLY_KEYS[1].encode())
    return [
        b"\x4a" + _BYTE[len(key) + 3 + n] + key + b"\x12" + _BYTE[1 + n] + b"\x18"
        for n in range(10)
    ]


_VERSION_PREFIX = _version_prefixes()


def _apply_value(place: int, value: Any) -> bytes | None:
    """The KeyValue of the record's attribute at ``place``, cached unless it is the version
    (None for a value ``_key_value`` does not do)."""
    encoded = _key_value(b"\x4a", APPLY_KEYS[place], value)
    if encoded is not None and place != 1 and type(value) in (str, int):
        cache = _apply_values[place]
        if len(cache) >= _CACHED:
            cache.clear()
        cache[value] = encoded
    return encoded


def _parent(context: bytes) -> tuple[int, int, int, int] | None:
    """A record's wire trace context as (trace id high, low, parent span id, flags); None when
    it is not a valid, sampled one (``record_span`` makes no span of it)."""
    if len(context) < CONTEXT_BYTES:
        return None
    wire_version, high, low, parent_id, flags = _WIRE(context)
    if wire_version or not flags & 1 or not (high or low) or not parent_id:
        return None
    return high, low, parent_id, flags


def _apply_span(record: ApplyRecord) -> bytes | None:
    """The Span message of an apply record, byte for byte what ``_span`` writes for the
    ``ReadableSpan`` ``tracing.record_span`` makes of it (ids aside: the span id is made here,
    as the SDK's random generator makes it); None when the record's context is not a valid,
    sampled one, for which ``record_span`` makes no span."""
    context, start, end, actor_id, version, seqs, changes, peer, via = record
    parent = _parent(context)
    if parent is None:
        return None
    high, low, parent_id, _flags = parent
    span_id = _getrandbits(64)
    while not span_id:
        span_id = _getrandbits(64)
    if not (start and end) or not 0 <= version < 0x8000_0000_0000_0000:
        return _odd_apply_span(record, span_id)
    actor_kv = _actor_values.get(actor_id) or _apply_value(0, actor_id)
    seqs_kv = _seqs_values.get(seqs) or _apply_value(2, seqs)
    changes_kv = _changes_values.get(changes) or _apply_value(3, changes)
    peer_kv = _peer_values.get(peer) or _apply_value(4, peer)
    via_kv = _via_values.get(via) or _apply_value(5, via)
    if (
        actor_kv is None
        or seqs_kv is None
        or changes_kv is None
        or peer_kv is None
        or via_kv is None
    ):  # a value of a type ``_key_value`` does not do
        return _odd_apply_span(record, span_id)
    number = _varint(version)
    return b"".join(
        (
            _IDS_PARENT(0x0A10, high, low, 0x1208, span_id, 0x2208, parent_id),
            _APPLY_HEAD,
            _TIMES(0x39, start, 0x41, end),
            actor_kv,
            _VERSION_PREFIX[len(number)],
            number,
            seqs_kv,
            changes_kv,
            peer_kv,
            via_kv,
            _APPLY_TAIL,
        )
    )


def _odd_apply_span(record: ApplyRecord, span_id: int) -> bytes | None:
    """A record with a time of 0 or a value of a type ``_key_value`` does not do: encoded as
    the span ``tracing.record_span`` would have made of it is."""
    span = readable_span(record, span_id)
    return _span(span) if span is not None else None


def readable_span(
    record: ApplyRecord,
    span_id: int = 0,
    resource: Resource | None = None,
    scope: InstrumentationScope | None = None,
) -> ReadableSpan | None:
    """The ``ReadableSpan`` ``tracing.record_span`` makes of what ``record`` describes (for an
    exporter that gets records but exports with the SDK's encoder; and the tests), with
    ``span_id`` (0: a random one); None when its context is not a valid, sampled one."""
    context, start, end, *values = record
    wire = _parent(context)
    if wire is None:
        return None
    high, low, parent_id, flags = wire
    parent = SpanContext(high << 64 | low, parent_id, True, TraceFlags(flags))
    while not span_id:
        span_id = _getrandbits(64)
    span_context = SpanContext(
        parent.trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED | (flags & 0x02))
    )
    return ReadableSpan(
        APPLY_SPAN,
        span_context,
        parent,
        resource,
        dict(zip(APPLY_KEYS, values, strict=True)),  # type: ignore[arg-type]
        kind=APPLY_KIND,
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


def _sdk_span(span: ReadableSpan) -> tuple[bytes, Any]:
    """The SDK's encoding of ``span`` and of the ResourceSpans it went into."""
    resource_spans = encode_spans([span]).resource_spans[0]
    return resource_spans.scope_spans[0].spans[0].SerializeToString(), resource_spans


def _settle_environment(session: requests.Session, url: str) -> None:
    """Read once what a requests session reads from the environment on every request: the
    proxy for ``url`` (``*_PROXY``, ``NO_PROXY``: a scan of every variable), the CA bundle
    (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``) and ``.netrc`` credentials; ~0.5 ms of CPU
    per export otherwise. The session then uses these settings without looking again."""
    settings = session.merge_environment_settings(url, {}, None, None, None)
    auth = session.auth or requests.utils.get_netrc_auth(url)
    session.trust_env = False
    session.proxies = settings["proxies"]
    session.verify = settings["verify"]
    session.cert = settings["cert"]
    if auth:
        session.auth = auth


# a ScopeSpans.spans field's tag and length, by length (most spans are shorter than 4 kB)
_SPAN_FIELDS = [b"\x12" + _varint(n) for n in range(4096)]


def records_group(resource: Resource, scope: InstrumentationScope) -> RecordsGroup:
    """What ``encode_request`` needs to place apply records of ``resource`` and ``scope``: the
    two, and the SDK's ResourceSpans for them (made once, from a span of theirs)."""
    probe = readable_span((_PROBE_CONTEXT, 1, 2, "", 0, "", 0, "", ""), 1, resource, scope)
    assert probe is not None
    return resource, scope, _sdk_span(probe)[1]


RecordsGroup = tuple[Resource, InstrumentationScope, Any]
_PROBE_CONTEXT = b"\x00" + b"\x01" * 24 + b"\x01"


def encode_request(
    spans: Sequence[ReadableSpan | ApplyRecord | RecordedSpan | bytes],
    records: RecordsGroup | None = None,
) -> bytes:
    """An ExportTraceServiceRequest of ``spans``, grouped by resource then scope in order of
    appearance, as the SDK's ``encode_spans`` groups them. Apply records among them (only
    with ``records``: their resource and scope) are the spans ``tracing.record_span`` makes
    of them; one whose context is not valid and sampled is left out, as that span is. A
    ``RecordedSpan`` (the request's, also with ``records``) is its ``ReadableSpan``, and
    ``bytes`` are such a span's Span message (``ended_span``)."""
    groups: dict[Any, dict[Any, list[bytes]]] = {}
    headers: dict[tuple[Any, Any], Any] = {}  # the SDK's ResourceSpans of one span per group
    last_resource = last_scope = None  # spans come in runs of one scope
    last_group: list[bytes] = []
    resource: Any
    scope: Any
    span: ReadableSpan
    for item in spans:
        if isinstance(item, (bytes, tuple, RecordedSpan)):
            # a record (a request's span, encoded or not; an apply record): of ``records``'
            # resource and scope
            if isinstance(item, bytes):
                encoded: bytes | None = item
            elif isinstance(item, tuple):
                encoded = _apply_span(item)
            else:
                encoded = _recorded_span(item)
            if encoded is not None:
                assert records is not None, "records without their resource and scope"
                resource, scope, header = records
                if resource is not last_resource or scope is not last_scope:
                    headers.setdefault((resource, scope), header)
                    last_resource, last_scope = resource, scope
                    last_group = groups.setdefault(resource, {}).setdefault(scope, [])
                last_group.append(encoded)
                continue
            if not isinstance(item, RecordedSpan):
                continue  # an apply record of no valid, sampled context: no span
            span = item.readable()  # a shape left to the SDK's encoder
        else:
            span = item
        if _DIRECT and type(span) is ReadableSpan:
            resource, scope = _resource_scope(span.__dict__)
        else:
            resource, scope = span.resource, span.instrumentation_scope
        scope = scope or None
        encoded = _span(span)
        if resource is last_resource and scope is last_scope and encoded is not None:
            last_group.append(encoded)
            continue
        if encoded is None or (resource, scope) not in headers:
            sdk_encoded, headers[resource, scope] = _sdk_span(span)
            encoded = encoded if encoded is not None else sdk_encoded
        last_resource, last_scope = resource, scope
        last_group = groups.setdefault(resource, {}).setdefault(scope, [])
        last_group.append(encoded)
    out = []
    for resource, scopes in groups.items():
        scope_spans = []
        for scope, encoded_spans in scopes.items():
            header = headers[resource, scope]
            sdk_scope_spans = header.scope_spans[0]
            scope_spans.append(
                _field(
                    b"\x12",
                    _field(b"\x0a", sdk_scope_spans.scope.SerializeToString())
                    + b"".join(
                        [
                            (_SPAN_FIELDS[n] if (n := len(s)) < 4096 else b"\x12" + _varint(n)) + s
                            for s in encoded_spans
                        ]
                    )
                    + (
                        _field(b"\x1a", sdk_scope_spans.schema_url.encode())
                        if sdk_scope_spans.schema_url
                        else b""
                    ),
                )
            )
        header = headers[resource, next(iter(scopes))]
        out.append(
            _field(
                b"\x0a",
                _field(b"\x0a", header.resource.SerializeToString())
                + b"".join(scope_spans)
                + (_field(b"\x1a", header.schema_url.encode()) if header.schema_url else b""),
            )
        )
    return b"".join(out)


class _Quieter(logging.LoggerAdapter):
    """A logger whose every record is DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


class SpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (its configuration, ``OTEL_EXPORTER_OTLP_*``, transport,
    retries and metrics) encoding with ``encode_request``. It sends through the SDK exporter's
    request client (``_client``, as in opentelemetry-exporter-otlp-proto-http 1.45); with a
    version without one it is the SDK's exporter unchanged. It also takes records, once told
    their resource and scope (``takes_records``): apply records (``tracing.apply_recorder``)
    and ended request spans (``RecordedSpan``, ``tracing.start_span``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._records: RecordsGroup | None = None
        self._failing = 0  # exports failed in a row: logged when it starts and when it ends
        client = getattr(self, "_client", None)
        if isinstance(getattr(client, "_logger", None), logging.Logger):
            # its WARNING per retry and ERROR per failed batch (every few seconds while the
            # collector is down) become DEBUG: ``export`` logs the state changes instead
            client._logger = _Quieter(client._logger, {})  # type: ignore[union-attr]
        transport = getattr(client, "_transport", None)
        session = getattr(transport, "_session", None)
        if isinstance(session, requests.Session) and session.trust_env:
            _settle_environment(session, self._endpoint)

    @property
    def encodes(self) -> bool:
        """Whether ``export`` encodes with ``encode_request`` (this SDK version's exporter has
        the request client it sends through)."""
        client = getattr(self, "_client", None)
        return hasattr(client, "export") and getattr(self, "_metrics", None) is not None

    def takes_records(self, resource: Resource, scope: InstrumentationScope) -> None:
        """Records may come among the spans from now on: they are of ``resource`` and
        ``scope`` (the provider's, and the tracer's that ``record_span`` and ``start_span``
        stand for)."""
        self._records = records_group(resource, scope)

    def export(
        self, spans: Sequence[ReadableSpan | ApplyRecord | RecordedSpan | bytes]
    ) -> SpanExportResult:
        if self._shutdown or not self.encodes:
            return super().export(self._readable(spans))
        client, metrics = self._client, self._metrics
        with metrics.export_operation(len(spans)) as result:
            try:
                data = encode_request(spans, self._records)
            except Exception as error:  # noqa: BLE001 — dropped and logged, as the SDK does
                log.error("tracing: failed to encode %d spans: %s", len(spans), error)
                result.error = error
                return SpanExportResult.FAILURE
            # (the SDK's 64 MiB request limit: a batch of 512 apply spans is ~100 kB)
            sent = client.export(data)
            if not sent.success:
                result.error = sent.error
                status_code = getattr(sent, "status_code", None)
                if status_code is not None:
                    result.error_attrs = {"http.response.status_code": status_code}
                self._failed(len(spans), status_code, sent.error)
                return SpanExportResult.FAILURE
        if self._failing:
            log.info(
                "tracing: the OTLP collector at %s takes spans again (%d exports failed before)",
                self._endpoint,
                self._failing,
            )
            self._failing = 0
        return SpanExportResult.SUCCESS

    def _failed(self, spans: int, status_code: int | None, error: Any) -> None:
        self._failing += 1
        why = f"HTTP {status_code}" if status_code is not None else str(error or "no answer")
        if self._failing == 1:
            log.warning(
                "tracing: cannot export spans to the OTLP collector at %s (%s): their batches "
                "are dropped until it answers (an INFO line says when it does)",
                self._endpoint,
                why,
            )
        else:
            log.debug("tracing: export of %d spans failed again (%s)", spans, why)

    def _readable(
        self, spans: Sequence[ReadableSpan | ApplyRecord | RecordedSpan | bytes]
    ) -> list[ReadableSpan]:
        """``spans`` with their records made ``ReadableSpan``s (the SDK's encoder); encoded
        spans are left out (only queued for an exporter that ``encodes``: this is its
        shutdown)."""
        resource, scope, _header = self._records or (None, None, None)
        out = []
        for span in spans:
            readable: ReadableSpan | None
            if isinstance(span, tuple):
                readable = readable_span(span, 0, resource, scope)
            elif isinstance(span, RecordedSpan):
                readable = span.readable()
            elif isinstance(span, bytes):
                readable = None
            else:
                readable = span
            if readable is not None:
                out.append(readable)
        return out
