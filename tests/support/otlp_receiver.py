"""An OTLP/HTTP trace receiver for tests: a real HTTP server on loopback that accepts what an
OpenTelemetry exporter sends (``POST /v1/traces``, protobuf, optionally gzipped), decodes it
with opentelemetry-proto's generated classes and keeps every span, so a test can reassemble
traces exported by real agent processes.

    with OtlpReceiver() as receiver:          # or the ``otlp_receiver`` fixture
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        ...
        spans = await receiver.wait_for(lambda s: any(x.name == "..." for x in s))
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from support import wait_for, wait_for_sync


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, ids in lowercase hex (``parent_id`` None for a root span)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int  # the protobuf enum: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]  # (trace id, span id)
    resource: dict[str, Any]
    scope: str
    status: int = 0  # the protobuf enum: 0 unset, 1 ok, 2 error

    @property
    def service(self) -> str | None:
        return self.resource.get("service.name")

    @property
    def instance(self) -> str | None:
        return self.resource.get("service.instance.id")


@dataclass
class OtlpReceiver:
    """Serves OTLP/HTTP on ``127.0.0.1:<port>`` from a thread; ``spans`` grows as exports
    arrive. ``url`` is the base URL (what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes)."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    rejected: int = 0  # requests that were not OTLP trace exports
    refusing: int = 0  # when set, every export is answered with this HTTP status (e.g. 401)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps the connection open, as a collector does

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver._receive(self.path, self.headers, body)
                reply = ExportTraceServiceResponse().SerializeToString() if status == 200 else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:  # quiet: pytest shows failures
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return self.url + "/v1/traces"

    def start(self) -> OtlpReceiver:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self, path: str, headers: Any, body: bytes) -> int:
        if self.refusing:
            return self.refusing
        if path != "/v1/traces":
            with self._lock:
                self.rejected += 1
            return 404
        encoding = (headers.get("Content-Encoding") or "").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError):  # counted: a test sees it
            with self._lock:
                self.rejected += 1
            return 400
        received = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    received.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex() or None,
                            name=s.name,
                            kind=int(s.kind),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=_attributes(s.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in s.events],
                            links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                            resource=resource,
                            scope=ss.scope.name,
                            status=int(s.status.code),
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(received)
        return 200

    # -- reading what arrived ------------------------------------------------------------------

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.snapshot() if s.name == name]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.snapshot() if s.trace_id == trace_id]

    async def wait_for(
        self,
        condition: Callable[[list[ReceivedSpan]], Any],
        timeout: float = 60.0,
        what: str = "",
    ) -> Any:
        """Poll until ``condition(spans)`` returns something true, and return that."""
        return await wait_for(lambda: condition(self.snapshot()), timeout, what)

    def wait_for_sync(
        self, condition: Callable[[list[ReceivedSpan]], Any], timeout: float = 60.0, what: str = ""
    ) -> None:
        wait_for_sync(lambda: bool(condition(self.snapshot())), timeout, what)


def ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """``span``'s parent, grandparent, ... as far as the received spans go."""
    by_id = {s.span_id: s for s in spans if s.trace_id == span.trace_id}
    out: list[ReceivedSpan] = []
    parent = span.parent_id
    while parent is not None and parent in by_id and len(out) <= len(by_id):
        out.append(by_id[parent])
        parent = by_id[parent].parent_id
    return out


def is_descendant(span: ReceivedSpan, ancestor: ReceivedSpan, spans: list[ReceivedSpan]) -> bool:
    return any(a.span_id == ancestor.span_id for a in ancestors(span, spans))
