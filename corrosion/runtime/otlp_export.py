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
import struct
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import StatusCode

log = logging.getLogger("corrosion.tracing")

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_INT64 = range(-(2**63), 2**63)
# Span.flags (field 16, fixed32): "has is_remote", and "is remote" when the parent is
_FLAGS_LOCAL_PARENT = b"\x85\x01" + _FIXED32(0x100)
_FLAGS_REMOTE_PARENT = b"\x85\x01" + _FIXED32(0x300)


class CachedHashResource(Resource):
    """The provider's resource, its hash computed once: the SDK's encoder groups spans by
    resource and hashes it per span (a JSON dump of every resource attribute, ~6 µs)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else _varint(n)) + payload


# encoded attributes by (field tag, key, type, value): most repeat from span to span (actor,
# peer, via)
_encoded: dict[tuple[bytes, str, type, Any], bytes] = {}
_SCALARS = (str, int, bool, float)


def _scalar(value: Any) -> bytes | None:
    """An AnyValue of a str, int, bool or float; None for anything else."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is int:
        return b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF) if value in _INT64 else None
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    return None


def _key_value(tag: bytes, key: str, value: Any) -> bytes | None:
    """A KeyValue field ``tag``: a scalar or a tuple of scalars (the SDK's attribute values);
    None for anything else (the SDK's encoder does those)."""
    kind = type(value)
    if kind in _SCALARS:
        found = _encoded.get((tag, key, kind, value))
        if found is not None:
            return found
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
    if kind in _SCALARS and kind is not float:  # -0.0 == 0.0, nan != nan
        if len(_encoded) >= 4096:
            _encoded.clear()
        _encoded[tag, key, kind, value] = encoded
    return encoded


def _attributes(tag: bytes, attributes: Any) -> list[bytes] | None:
    out = []
    for key, value in (attributes or {}).items():
        encoded = _key_value(tag, key, value)
        if encoded is None:
            return None
        out.append(encoded)
    return out


def _event(event: Any) -> bytes | None:
    """A Span.Event message, or None when an attribute is not of a type ``_key_value`` does."""
    attributes = _attributes(b"\x1a", event.attributes)
    if attributes is None or event.dropped_attributes:
        return None
    parts = [b"\x09" + _FIXED64(event.timestamp)] if event.timestamp else []
    if event.name:
        parts.append(_field(b"\x12", event.name.encode()))
    return b"".join(parts + attributes)


def _span(span: ReadableSpan) -> bytes | None:
    """The Span message, or None when it is not of the plain shape: links, a trace state,
    something dropped, an attribute value ``_key_value`` does not do."""
    if span.links or span.dropped_attributes or span.dropped_events:
        return None
    context = span.get_span_context()
    parent = span.parent
    if context is None or context.trace_state:
        return None
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
    ]
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_field(b"\x2a", span.name.encode()))
    parts.append(b"\x30" + bytes((span.kind.value + 1,)))  # the API's kinds count from 0
    if span.start_time:
        parts.append(b"\x39" + _FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + _FIXED64(span.end_time))
    attributes = _attributes(b"\x4a", span.attributes)
    if attributes is None:
        return None
    parts += attributes
    for event in span.events:
        encoded = _event(event)
        if encoded is None:
            return None
        parts.append(_field(b"\x5a", encoded))
    status = span.status
    code = status.status_code
    message = status.description
    parts.append(
        _field(
            b"\x7a",
            (_field(b"\x12", message.encode()) if message else b"")
            + (b"\x18" + bytes((code.value,)) if code is not StatusCode.UNSET else b""),
        )
    )
    parts.append(
        _FLAGS_REMOTE_PARENT if parent is not None and parent.is_remote else _FLAGS_LOCAL_PARENT
    )
    return b"".join(parts)


def _sdk_span(span: ReadableSpan) -> tuple[bytes, Any]:
    """The SDK's encoding of ``span`` and of the ResourceSpans it went into."""
    resource_spans = encode_spans([span]).resource_spans[0]
    return resource_spans.scope_spans[0].spans[0].SerializeToString(), resource_spans


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An ExportTraceServiceRequest of ``spans``, grouped by resource then scope in order of
    appearance, as the SDK's ``encode_spans`` groups them."""
    groups: dict[Any, dict[Any, list[bytes]]] = {}
    headers: dict[tuple[Any, Any], Any] = {}  # the SDK's ResourceSpans of one span per group
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope or None
        encoded = _span(span)
        if encoded is None or (resource, scope) not in headers:
            sdk_encoded, headers[resource, scope] = _sdk_span(span)
            encoded = encoded if encoded is not None else sdk_encoded
        groups.setdefault(resource, {}).setdefault(scope, []).append(encoded)
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
                    + b"".join(_field(b"\x12", s) for s in encoded_spans)
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
