"""The OTLP/HTTP span exporter corrosion installs: the SDK's, with a cheaper encoding of the
spans it exports most (one ``corrosion.apply`` per version applied).

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
import struct
from collections.abc import Sequence
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import Status, StatusCode

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
    parts = [b"\x09" + _FIXED64(event.timestamp)] if event.timestamp else []
    if event.name:
        parts.append(_field(b"\x12", event.name.encode()))
    if not _attributes(b"\x1a", event.attributes, parts):
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
        encoded = _event(event)
        if encoded is None:
            return None
        parts.append(_field(b"\x5a", encoded))
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


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An ExportTraceServiceRequest of ``spans``, grouped by resource then scope in order of
    appearance, as the SDK's ``encode_spans`` groups them."""
    groups: dict[Any, dict[Any, list[bytes]]] = {}
    headers: dict[tuple[Any, Any], Any] = {}  # the SDK's ResourceSpans of one span per group
    last_resource = last_scope = None  # spans come in runs of one scope
    last_group: list[bytes] = []
    for span in spans:
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
                    + b"".join([b"\x12" + _varint(len(s)) + s for s in encoded_spans])
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


class SpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (its configuration, ``OTEL_EXPORTER_OTLP_*``, transport,
    retries and metrics) encoding with ``encode_request``. It sends through the SDK exporter's
    request client (``_client``, as in opentelemetry-exporter-otlp-proto-http 1.45); with a
    version without one it is the SDK's exporter unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        transport = getattr(getattr(self, "_client", None), "_transport", None)
        session = getattr(transport, "_session", None)
        if isinstance(session, requests.Session) and session.trust_env:
            _settle_environment(session, self._endpoint)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        metrics = getattr(self, "_metrics", None)
        if self._shutdown or client is None or not hasattr(client, "export") or metrics is None:
            return super().export(spans)
        with metrics.export_operation(len(spans)) as result:
            try:
                data = encode_request(spans)
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
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
