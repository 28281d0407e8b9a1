"""The live span ``tracing.start_span`` makes with corrosion's provider (``POST
/v1/transactions``'s server span): what the SDK's span does, kept in plain fields, and handed
to the provider's batch processor as it is when it ends. corrosion's exporter
(``otlp_export``) encodes it straight to OTLP; for any other, the recorder that made it makes
it the ``ReadableSpan`` the SDK would have (``readable``).

Kept apart from both (no SDK import) so that neither imports the other for it.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceState

log = logging.getLogger("corrosion.tracing")

UNSET = Status(StatusCode.UNSET)
NO_TRACE_STATE = TraceState()  # the one a span without a trace state has (shared: ``is``)
PLAIN = (str, int, float, bool)  # attribute values kept as they are given
_PLAIN_TYPES = frozenset(PLAIN)

# an event: its name, attributes (cleaned as the SDK keeps an event's) and time (ns)
RecordedEvent = tuple[str, Mapping[str, Any], int]


class SpanRecorder(Protocol):
    """What a ``RecordedSpan`` needs of the recorder that made it (``tracing._Recorder``)."""

    finish: Callable[[RecordedSpan], None]

    def readable(self, span: RecordedSpan) -> Any: ...


class RecordedSpan(Span):
    """A live span: attributes, events, links, status, exceptions, ``with``, as the SDK's span
    has them (no limits: these spans have a handful of short attributes, an event or two and
    no links). Ended, it is handed to ``recorder.finish`` and never changes again (the
    exporter's thread reads it). One task uses it (no lock)."""

    def __init__(
        self,
        recorder: SpanRecorder,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any],
    ) -> None:
        self.recorder = recorder
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes: dict[str, Any] = {}
        self.events: list[RecordedEvent] = []
        self.links: list[Link] | tuple[()] = ()  # a list once one is added (rare)
        self.status = UNSET
        self.ended = False
        self.end_ns = 0
        for key, value in attributes.items():  # set_attribute's, without a call per key
            if type(value) in PLAIN and type(key) is str and key:
                self.attributes[key] = value
            else:
                self.attributes.update(BoundedAttributes(None, {key: value}))
        self.start_ns = time.time_ns()

    def readable(self) -> Any:
        """The SDK's ``ReadableSpan`` of this ended span (for the SDK's encoder)."""
        return self.recorder.readable(self)

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return not self.ended

    def set_attribute(self, key: str, value: Any) -> None:
        if self.ended:
            log.warning("Setting attribute on ended span.")
        elif type(value) in PLAIN and type(key) is str and key:
            self.attributes[key] = value
        else:  # cleaned (a list made a tuple) or dropped, with the SDK's warning
            self.attributes.update(BoundedAttributes(None, {key: value}))

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.ended:
            log.warning("Setting attribute on ended span.")
            return
        mine = self.attributes
        for key, value in attributes.items():  # set_attribute's, without a call per key
            if type(value) in PLAIN and type(key) is str and key:
                mine[key] = value
            else:
                mine.update(BoundedAttributes(None, {key: value}))

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self.ended:
            return
        # the attributes as the SDK keeps an event's: lists of scalars made tuples, anything
        # else cleaned or dropped by ``BoundedAttributes`` (with its warning)
        cleaned: Mapping[str, Any] = {}
        if attributes:
            plain: dict[str, Any] = {}
            for key, value in attributes.items():
                if type(value) is list and all(map(_PLAIN_TYPES.__contains__, map(type, value))):
                    value = tuple(value)
                elif type(value) not in PLAIN or type(key) is not str or not key:
                    cleaned = BoundedAttributes(None, attributes)
                    break
                plain[key] = value
            else:
                cleaned = plain
        when = time.time_ns() if timestamp is None else timestamp  # as the SDK's Event
        self.events.append((name, cleaned, when))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if not self.ended and context.is_valid:
            if not self.links:
                self.links = []
            self.links.append(Link(context, BoundedAttributes(None, attributes)))

    def update_name(self, name: str) -> None:
        if not self.ended:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # as the SDK's: OK is final, UNSET is ignored
        if self.ended or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self.status = status
        elif status is not StatusCode.UNSET:
            self.status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # the SDK's exception event
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        fields: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", {**fields, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.ended:
            log.warning("Calling end() on an ended span.")
            return
        self.ended = True
        self.end_ns = end_time if end_time is not None else time.time_ns()
        self.recorder.finish(self)

    def __exit__(self, exc_type: Any, exc_val: BaseException | None, exc_tb: Any) -> None:
        # as the SDK's span: an exception leaving the ``with`` is recorded and sets ERROR
        if exc_val is not None and not self.ended:
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()
