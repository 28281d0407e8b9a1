"""OpenTelemetry tracing: where spans go (``start_tracing``), and the helpers the agent (and the
orchestrator above it) use to make them and to carry their context across processes.

Off unless configured: with neither ``[telemetry] open-telemetry`` nor an
``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` in the environment, no SDK is imported and ``tracer()``
is the OpenTelemetry API's tracer, a no-op unless the embedding application installed its own
provider; ``OTEL_SDK_DISABLED=true`` turns it off whatever the config says. On, spans are
batched (``BatchSpanProcessor``, a background thread) and exported as OTLP/HTTP protobuf.

One provider per process: agents started in the same process (tests, benchmarks, an
application embedding several) share the first one's, and the last ``shutdown`` flushes and
stops it. corrosion's spans come from ``tracer()``, which returns that provider's tracer, not
the API's global one, so a benchmark can turn tracing on and off again in one run.

The wire form of a span context (``context_bytes``) is what a changeset carries
(corrosion/core/changeset.py): the W3C trace-context binary layout, version byte 0, then the
16-byte trace id, the 8-byte span id and the flags byte (26 bytes).
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import threading
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    TraceFlags,
    Tracer,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..config import ConfigError, OpenTelemetryConfig
from .apply_records import CONTEXT_BYTES, WIRE_CONTEXT, ApplyRecord
from .recorded_span import NO_TRACE_STATE, UNSET, RecordedSpan

log = logging.getLogger("corrosion.tracing")

SCOPE = "corrosion"
_PROPAGATOR = TraceContextTextMapPropagator()
_CONTEXT_VERSION = 0
EXPORT_BATCH = 2048  # spans an export sends at most, unless OTEL_BSP_* say otherwise

# OTEL_TRACES_SAMPLER's values the SDK knows (an unknown one would silently mean the default)
SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)


@dataclass(frozen=True)
class TracingSettings:
    """Where spans go, resolved from the config and the environment: ``endpoint`` is the full
    OTLP/HTTP traces URL, or None to let the exporter read ``OTEL_EXPORTER_OTLP_*``."""

    endpoint: str | None


def _env_true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def resolve(
    config: OpenTelemetryConfig | None, env: Mapping[str, str] | None = None
) -> TracingSettings | None:
    """Whether and where to export spans, from ``[telemetry] open-telemetry`` and the
    ``OTEL_*`` environment; None when tracing is off. Raises ``ConfigError`` (one line naming
    the setting and the remedy) for a value the exporter could not use."""
    env = os.environ if env is None else env
    if _env_true(env, "OTEL_SDK_DISABLED"):
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" and (config is None or config.endpoint is None):
        return None
    env_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if config is None and not env_endpoint:
        return None
    if exporter not in ("", "otlp", "none"):
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={exporter}: this agent exports traces only as OTLP; unset "
            "it, or set it to otlp or none"
        )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise ConfigError(
                f"{name}={protocol}: this agent exports OTLP over HTTP (protobuf) only; unset "
                "it or set it to http/protobuf, and point the endpoint at the collector's "
                "OTLP/HTTP port (4318)"
            )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        url = env.get(name)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ConfigError(
                f"{name}={url}: expected the http:// or https:// URL of an OTLP/HTTP collector "
                "(e.g. http://localhost:4318)"
            )
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER={sampler}: unknown sampler; use one of "
            + ", ".join(sorted(SAMPLERS))
        )
    if sampler.endswith("traceidratio") and env.get("OTEL_TRACES_SAMPLER_ARG"):
        arg = env["OTEL_TRACES_SAMPLER_ARG"]
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={arg}: the ratio of traces kept must be a number "
                "from 0 to 1"
            )
    if config is not None and config.endpoint is not None:
        return TracingSettings(traces_url(config.endpoint))
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return TracingSettings(env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])  # used as it is
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        # the base URL of every signal: the spec appends the signal's path to whatever it is
        return TracingSettings(env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces")
    return TracingSettings(None)  # the exporter's default, localhost:4318


def traces_url(endpoint: str) -> str:
    """corrosion's ``exporter.endpoint`` is the collector's address: ``/v1/traces`` is added
    when it names no path; a path is kept as given (a collector behind a proxy)."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


# -- the process's provider ----------------------------------------------------------------------

_lock = threading.Lock()
_provider: Any = None  # the SDK TracerProvider while some handle holds it
_recorder: _Recorder | None = None  # records finished spans straight into _provider's processor
_handles = 0
_tracers: dict[str, Tracer] = {}


class TracingHandle:
    """What ``start_tracing`` returns: ``shutdown`` releases this holder's share of the
    process's provider; the last one flushes the queued spans and stops the exporter."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self._released = not active

    def force_flush(self, timeout_ms: int = 10_000) -> bool:
        """Export the spans queued so far (tests and the orchestrator's checkpoints)."""
        provider = _provider
        return bool(provider.force_flush(timeout_ms)) if self.active and provider else True

    def shutdown(self) -> None:
        """Flush and stop (blocks for the export: call it from a worker thread)."""
        global _provider, _handles, _recorder
        if self._released:
            return
        self._released = True
        with _lock:
            _handles -= 1
            if _handles > 0:
                return
            provider, _provider = _provider, None
            _recorder = None
            _tracers.clear()
        if provider is not None:
            provider.shutdown()


def start_tracing(
    settings: TracingSettings | None,
    service_name: str,
    *,
    instance_id: str | None = None,
    attributes: Mapping[str, str] | None = None,
    exporter: Any = None,
) -> TracingHandle:
    """Install this process's tracer provider (a ``BatchSpanProcessor`` feeding an OTLP/HTTP
    exporter, or ``exporter`` when given, e.g. an in-memory one) unless one is installed
    already, and return a handle to release it. ``settings`` None (and no ``exporter``):
    tracing stays off and nothing is imported. The resource names the service
    (``OTEL_SERVICE_NAME`` wins over ``service_name``) and this instance (``instance_id``,
    the agent's actor id); ``OTEL_RESOURCE_ATTRIBUTES`` adds to it."""
    global _provider, _handles, _recorder
    if settings is None and exporter is None:
        return TracingHandle(False)
    with _lock:
        if _provider is None:
            _provider, _recorder = _new_provider(
                settings, service_name, instance_id, attributes, exporter
            )
            _tracers.clear()
            log.info(
                "tracing: exporting spans to %s",
                "the given exporter"
                if exporter is not None
                else (settings.endpoint if settings and settings.endpoint else "OTEL_EXPORTER_*"),
            )
        _handles += 1
    return TracingHandle(True)


def _new_provider(
    settings: TracingSettings | None,
    service_name: str,
    instance_id: str | None,
    attributes: Mapping[str, str] | None,
    exporter: Any,
) -> tuple[Any, _Recorder]:
    # imported here: an agent without tracing never loads the SDK or the exporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs: dict[str, str] = dict(attributes or {})
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attrs["service.name"] = service_name
    if instance_id is not None:
        attrs["service.instance.id"] = instance_id
    from .otlp_export import CachedHashResource, SpanExporter, ended_span

    if exporter is None:
        exporter = SpanExporter(endpoint=settings.endpoint if settings else None)
    resource = CachedHashResource(Resource.create(attrs))
    # the SDK's own exit hook would flush after the event loop is gone: the holders shut down
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    sizes: dict[str, Any] = {}
    if not os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") and not os.environ.get(
        "OTEL_BSP_MAX_QUEUE_SIZE"
    ):
        # each export is an HTTP request, ~0.5 ms of CPU whatever its size: larger batches
        # than the SDK's 512 spans (2048) make that ~0.3 µs a span instead of ~1 µs
        sizes = {"max_export_batch_size": EXPORT_BATCH, "max_queue_size": 4 * EXPORT_BATCH}
    processor = BatchSpanProcessor(exporter, **sizes)
    provider.add_span_processor(processor)
    recorder = _Recorder(provider, processor)
    if isinstance(exporter, SpanExporter):
        exporter.takes_records(recorder.resource, recorder.scope)
        recorder.exports_records(ended_span if exporter.encodes else None)
    else:  # another exporter: apply and request spans are ReadableSpans
        recorder.queue_records = None
    return provider, recorder


def active() -> bool:
    """Whether corrosion's provider is installed in this process."""
    return _provider is not None


def enabled() -> bool:
    """Whether spans are worth making: corrosion's provider is installed, or the embedding
    application installed the API's global one. Off, the agent skips its span code entirely."""
    return _provider is not None or not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    )


# The server span of the request being served (``surfaces.http_spans``): the runtime describes
# the transaction on it instead of opening a child span of its own (one span per write where
# one suffices: each costs ~20 µs of CPU).
request_span: ContextVar[Span | None] = ContextVar("corrosion_request_span", default=None)


class _Recorder:
    """Makes corrosion's own spans without the SDK's span lifecycle, for the paths traced per
    write: an apply (``record_span``: both ends known, recorded once finished) and a request
    (``start_span``: a ``RecordedSpan``, recorded when it ends). Either hands the finished
    span to the provider's one processor, as ``Span.end`` would: what the SDK's ``start_span``
    + ``end`` produce (ids, trace flags, sampling, resource, scope), at a fraction of their CPU
    (no attribute re-validation, lock, limits or per-span metrics), as a ``ReadableSpan`` or,
    for corrosion's exporter, as it is (``exports_records``). Only for corrosion's own
    provider, whose only processor ``_new_provider`` made (its ``on_start`` does nothing). The
    ``OTEL_*_LIMIT`` span limits are not applied: these spans have a handful of short
    attributes, at most an event or two and no links."""

    def __init__(self, provider: Any, processor: Any) -> None:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.readable_span = _readable_span_maker(ReadableSpan)
        self.event = Event
        # the processor's queue (``BatchSpanProcessor.on_end`` checks the span is sampled,
        # which these always are, then calls it), or its ``on_end`` in another SDK version
        batch = getattr(processor, "_batch_processor", None)
        self.on_end = getattr(batch, "emit", None) or processor.on_end
        self.resource = provider.resource
        self.new_span_id = provider.id_generator.generate_span_id
        # the SDK's random ids: made inline (``start``), without its method calls
        self.random_ids = type(provider.id_generator) is RandomIdGenerator
        if self.random_ids:
            self.new_span_id = _random_span_id
        self.new_trace_id = provider.id_generator.generate_trace_id
        self.random_trace_ids = provider.id_generator.is_trace_id_random()
        self.sampler = provider.sampler
        # the parentbased_* samplers (the default, parentbased_always_on, and the sampling
        # docs/agent.md recommends, parentbased_traceidratio) keep a child exactly when its
        # parent was sampled, their root sampler aside: no need to ask them about a child
        described = self.sampler.get_description()
        default = ParentBased(ALWAYS_ON).get_description()
        self.follows_parent = (
            described.startswith("ParentBased{root:")
            and described.split(",", 1)[1:] == default.split(",", 1)[1:]
        )
        # and the default keeps every root: nothing to ask it for a request without a parent
        self.keeps_roots = described in (default, ALWAYS_ON.get_description())
        self.scope = InstrumentationScope(SCOPE, "")  # as ``get_tracer(SCOPE)`` names it
        # how ``apply_recorder`` queues apply records: into the batch processor's own queue
        # (its limits, dropped-span count, schedule and flush), when the sampler follows the
        # parent (the record's sampled flag decides) and span ids are the SDK's random ones
        # (the exporter makes them); ``_new_provider`` keeps it only for corrosion's exporter
        self.queue_records: Callable[[list[ApplyRecord]], None] | None = None
        if hasattr(batch, "emit") and self.follows_parent and self.new_span_id is _random_span_id:
            self.queue_records = _records_queuer(batch)
        # what an ended ``RecordedSpan`` is handed to: made a ``ReadableSpan`` for the
        # processor, or queued as it is once the exporter takes records (``exports_records``)
        self.emit = getattr(batch, "emit", None)
        self.finish: Callable[[RecordedSpan], None] = self.finish_readable

    def exports_records(self, encode: Callable[[RecordedSpan], Any] | None) -> None:
        """The exporter is corrosion's (``otlp_export``), which takes a ``RecordedSpan`` as it
        is, or ``encode``'s encoding of it: ended request spans go into the batch processor's
        queue so."""
        emit = self.emit
        if emit is None:
            return
        if encode is None:
            self.finish = emit
            return

        def finish_encoded(span: RecordedSpan) -> None:
            emit(encode(span))

        self.finish = finish_encoded

    def record(
        self,
        name: str,
        parent: SpanContext,
        kind: SpanKind,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        status: Status | None,
    ) -> None:
        flags = parent[3]  # trace_flags (SpanContext is a tuple; its properties cost a call)
        if self.follows_parent:
            if not flags & TraceFlags.SAMPLED:
                return
            trace_state = parent[4]
        else:
            sampled = self.sampler.should_sample(
                trace.set_span_in_context(NonRecordingSpan(parent)),
                parent.trace_id,
                name,
                kind,
                attributes,
            )
            if not sampled.decision.is_sampled():
                return  # not exported (a record-only span would reach no exporter either)
            if sampled.attributes:
                attributes = {**attributes, **sampled.attributes}
            trace_state = sampled.trace_state
        context = _new_context(
            SpanContext,
            (
                parent[0],
                self.new_span_id(),
                False,
                _SAMPLED_RANDOM if flags & _RANDOM_TRACE_ID else _SAMPLED,
                trace_state,
                True,  # is_valid: the parent's trace id, a span id the generator made
            ),
        )
        self.on_end(
            self.readable_span(
                name,
                context,
                parent,
                self.resource,
                attributes,
                (),
                (),
                kind,
                None,  # instrumentation_info (deprecated: the scope says it)
                status or UNSET,
                start_ns,
                end_ns,
                self.scope,
            )
        )

    def start(
        self, name: str, parent: SpanContext | None, kind: SpanKind, attributes: dict[str, Any]
    ) -> Span:
        """A live span (a child of ``parent``, or a root), as ``Tracer.start_span`` decides it:
        ``RecordedSpan`` when sampled, else the ``NonRecordingSpan`` that carries the
        decision on."""
        # (SpanContext is a tuple: its fields by place, as its properties cost a call each)
        if parent is not None and parent[5]:  # is_valid
            trace_id = parent[0]
            random_ids = bool(parent[3] & _RANDOM_TRACE_ID)
        else:
            parent = None
            trace_id = (self.random_ids and _getrandbits(128)) or self.new_trace_id()
            random_ids = self.random_trace_ids
        if parent is not None and self.follows_parent:
            sampled = bool(parent[3] & TraceFlags.SAMPLED)
            trace_state = parent[4]
        elif parent is None and self.keeps_roots:
            sampled, trace_state = True, NO_TRACE_STATE
        else:
            decided = self.sampler.should_sample(
                trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None,
                trace_id,
                name,
                kind,
                attributes,
            )
            sampled = decided.decision.is_sampled()
            trace_state = decided.trace_state
            if sampled and decided.attributes:
                attributes = {**attributes, **decided.attributes}
        if not sampled:
            flags = TraceFlags(_RANDOM_TRACE_ID if random_ids else TraceFlags.DEFAULT)
            return NonRecordingSpan(
                SpanContext(trace_id, self.new_span_id(), False, flags, trace_state)
            )
        flags = _SAMPLED_RANDOM if random_ids else _SAMPLED
        if self.random_ids:  # both ids random, never 0: a valid context, made without checks
            span_id = _getrandbits(64) or _random_span_id()
            fields = (trace_id, span_id, False, flags, trace_state, True)
            context = _new_context(SpanContext, fields)
        else:
            context = SpanContext(trace_id, self.new_span_id(), False, flags, trace_state)
        return RecordedSpan(self, name, context, parent, kind, attributes)

    def readable(self, span: RecordedSpan) -> Any:
        """The ``ReadableSpan`` of an ended ``RecordedSpan``: what the SDK's span hands its
        processor."""
        return self.readable_span(
            span.name,
            span.context,
            span.parent,
            self.resource,
            span.attributes,
            tuple([self.event(name, attributes, at) for name, attributes, at in span.events]),
            tuple(span.links),
            span.kind,
            None,
            span.status,
            span.start_ns,
            span.end_ns,
            self.scope,
        )

    def finish_readable(self, span: RecordedSpan) -> None:
        self.on_end(self.readable(span))


_new_context = tuple.__new__  # a SpanContext whose fields are known valid, without its checks
_READABLE_SPAN_ARGS = (
    "name",
    "context",
    "parent",
    "resource",
    "attributes",
    "events",
    "links",
    "kind",
    "instrumentation_info",
    "status",
    "start_time",
    "end_time",
    "instrumentation_scope",
)


def _readable_span_maker(readable_span: Any) -> Any:
    """``ReadableSpan`` called with the ``_READABLE_SPAN_ARGS`` in that order: positional (a
    third cheaper than keywords) when this SDK's constructor takes them so, else by keyword
    (the ones given, not None)."""
    names = list(inspect.signature(readable_span).parameters)
    if tuple(names[: len(_READABLE_SPAN_ARGS)]) == _READABLE_SPAN_ARGS:
        return readable_span
    return lambda *args: readable_span(
        **{k: v for k, v in zip(_READABLE_SPAN_ARGS, args, strict=True) if v is not None}
    )


_getrandbits = random.getrandbits  # the SDK's RandomIdGenerator's source of ids


def _random_span_id() -> int:
    """The SDK's ``RandomIdGenerator.generate_span_id``: 64 random bits, never 0."""
    span_id = random.getrandbits(64)
    while not span_id:
        span_id = random.getrandbits(64)
    return span_id


_RANDOM_TRACE_ID = 0x02  # W3C trace-context level 2: the trace id's right 7 bytes are random
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | _RANDOM_TRACE_ID)


def record_span(
    name: str,
    parent: SpanContext,
    kind: SpanKind,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any],
    status: Status | None = None,
) -> None:
    """A finished span, child of ``parent``, from ``start_ns`` to ``end_ns``: for spans made
    per version applied, where the SDK's own span lifecycle would cost more than the apply's
    tracing budget (docs/agent.md, Tracing). ``attributes`` must be valid attribute values
    and is kept as given."""
    recorder = _recorder
    if recorder is not None and parent[5]:  # is_valid (SpanContext is a tuple)
        recorder.record(name, parent, kind, start_ns, end_ns, attributes, status)
        return
    # the embedding application's provider (or the API's no-op): its own span lifecycle
    span = tracer().start_span(
        name,
        context=trace.set_span_in_context(NonRecordingSpan(parent)),
        kind=kind,
        start_time=start_ns,
        attributes=attributes,
    )
    if status is not None:
        span.set_status(status)
    span.end(end_time=end_ns)


def apply_recorder() -> Callable[[list[ApplyRecord]], None] | None:
    """The function queuing applied versions' ``corrosion.apply`` spans as ``ApplyRecord``s
    (``apply_records``: each's parent the remote context its changeset carried, no status), or
    None when such spans must go through ``record_span``: tracing off or not corrosion's
    provider, an exporter other than corrosion's OTLP one, a sampler that is not parent-based,
    a custom id generator. Asked once per batch of versions (the answer holds while tracing
    is on)."""
    recorder = _recorder
    return recorder.queue_records if recorder is not None else None


# what ``_records_queuer`` reads of the SDK's BatchProcessor (as ``emit`` does)
_BATCH_FIELDS = (
    "_queue",
    "_max_queue_size",
    "_max_export_batch_size",
    "_worker_awaken",
    "_shutdown",
    "_pid",
)


def _records_queuer(batch: Any) -> Callable[[list[ApplyRecord]], None]:
    """``batch.emit`` (the SDK's ``BatchProcessor``) of each record, done as one ``extendleft``
    of its queue when the records fit and this SDK's processor has the fields read here (as in
    1.45): the same queue, order and wake-up of its exporting thread. When they do not fit, or
    the processor is stopped or in a forked child, each goes through ``emit``, which counts
    and logs the spans dropped."""
    emit = batch.emit
    if not all(hasattr(batch, name) for name in _BATCH_FIELDS):

        def emit_each(records: list[ApplyRecord]) -> None:
            for record in records:
                emit(record)

        return emit_each

    def queue_records(records: list[ApplyRecord]) -> None:
        queue = batch._queue
        if (
            batch._shutdown
            or len(queue) + len(records) > batch._max_queue_size
            or batch._pid != os.getpid()
        ):
            for record in records:
                emit(record)
            return
        queue.extendleft(records)
        if len(queue) >= batch._max_export_batch_size and not batch._worker_awaken.is_set():
            batch._worker_awaken.set()

    return queue_records


# The API's current context, when it is its default (a ContextVar of ``Context``s):
# ``make_current`` and ``start_span`` read and set it without the API's calls around it
_runtime_context = getattr(otel_context, "_RUNTIME_CONTEXT", None)
_current_context: ContextVar[Context] | None = (
    getattr(_runtime_context, "_current_context", None)
    if type(_runtime_context) is ContextVarsRuntimeContext
    else None
)


def start_span(
    name: str, parent: SpanContext | None, kind: SpanKind, attributes: dict[str, Any]
) -> Span:
    """A live span, child of ``parent`` (None: of the current span, if any), for a path made
    per write (``POST /v1/transactions``'s server span): with corrosion's provider, a
    ``RecordedSpan`` (a fifth of the SDK span's CPU), else the installed provider's span.
    End it (or use it in a ``with``)."""
    recorder = _recorder
    # None: the current span's, if there is one (most requests have none: then one look at
    # the API's context variable instead of its calls)
    if parent is None and (_current_context is None or _SPAN_KEY in _current_context.get()):
        current = trace.get_current_span().get_span_context()
        parent = current if current.is_valid else None
    if recorder is not None:
        return recorder.start(name, parent, kind, attributes)
    context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    return tracer().start_span(name, context=context, kind=kind, attributes=attributes)


def make_current(span: Span) -> Token[Context]:
    """Make ``span`` the current span (a span made from now on is its child) until
    ``restore_current`` is given the returned token: the API's ``attach`` of
    ``set_span_in_context(span)``, without its calls."""
    if _current_context is None:
        return otel_context.attach(trace.set_span_in_context(span))
    return _current_context.set(Context({**_current_context.get(), _SPAN_KEY: span}))


def restore_current(token: Token[Context]) -> None:
    """Undo ``make_current`` (a failure is logged, as the API's ``detach`` does)."""
    if _current_context is None:
        otel_context.detach(token)
        return
    try:
        _current_context.reset(token)
    except (RuntimeError, ValueError):  # used already, or of another context
        log.exception("Failed to detach context")


class current:
    """``with current(span):`` makes ``span`` the current span within the block (a span made
    there is its child) without ending it: the API's ``use_span`` without its generator."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        self.token = make_current(self.span)
        return self.span

    def __exit__(self, *_exc: object) -> None:
        restore_current(self.token)


def set_span_in_context(span: Span) -> Context:
    """A parent ``Context`` for a span made outside ``span``'s ``with`` block."""
    return trace.set_span_in_context(span)


def tracer(scope: str = SCOPE) -> Tracer:
    """The tracer for ``scope`` (``corrosion``, ``orchestrator``): the installed provider's, or
    the API's (no-op, or the embedding application's provider)."""
    found = _tracers.get(scope)
    if found is None:
        provider = _provider
        found = provider.get_tracer(scope) if provider is not None else trace.get_tracer(scope)
        if provider is not None:
            _tracers[scope] = found
    return found


# -- carrying a span context --------------------------------------------------------------------


def context_bytes(span: Span | SpanContext | None = None) -> bytes | None:
    """The wire form of ``span``'s context (default: the current span's), for a changeset or
    a step log; None when there is nothing to carry (no span, or not sampled)."""
    if type(span) is RecordedSpan and span.context[5]:  # valid (and sampled: recorded)
        ctx = span.context
        return _PACK_CONTEXT(_CONTEXT_VERSION, ctx[0] >> 64, ctx[0] & _M64, ctx[1], ctx[3])
    if span is None:
        span = trace.get_current_span()
    ctx = span if isinstance(span, SpanContext) else span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return (
        bytes((_CONTEXT_VERSION,))
        + ctx.trace_id.to_bytes(16, "big")
        + ctx.span_id.to_bytes(8, "big")
        + bytes((ctx.trace_flags,))
    )


def span_context_from_bytes(data: bytes | None) -> SpanContext | None:
    """The remote span context ``context_bytes`` wrote; None for None or anything else (a
    newer version, a corrupt value: a trace link lost, never an error). Made per version
    applied: one unpack, and the SpanContext built from its checked fields."""
    if data is None or len(data) < CONTEXT_BYTES or data[0] != _CONTEXT_VERSION:
        return None
    _version, high, low, span_id, flags = WIRE_CONTEXT.unpack_from(data)
    if not (high or low) or not span_id:
        return None  # not a valid context
    return _new_context(
        SpanContext, (high << 64 | low, span_id, True, _TRACE_FLAGS[flags], NO_TRACE_STATE, True)
    )


_PACK_CONTEXT = WIRE_CONTEXT.pack
_M64 = 0xFFFF_FFFF_FFFF_FFFF
_TRACE_FLAGS = tuple(TraceFlags(flags) for flags in range(256))


def context_from_bytes(data: bytes | None) -> Context | None:
    """A parent ``Context`` for a span continuing the trace ``data`` carries, or None."""
    ctx = span_context_from_bytes(data)
    return trace.set_span_in_context(NonRecordingSpan(ctx)) if ctx is not None else None


def traceparent(span: Span | None = None) -> str | None:
    """``span``'s (default: the current span's) W3C ``traceparent`` header value."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier.get("traceparent")


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` (and ``tracestate``) to outgoing headers."""
    _PROPAGATOR.inject(carrier)


def extract(headers: Mapping[str, str]) -> Context | None:
    """The parent ``Context`` an incoming request's ``traceparent`` names, or None."""
    if "traceparent" not in headers:
        return None
    ctx = _PROPAGATOR.extract(headers)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def extract_span_context(headers: Mapping[str, str]) -> SpanContext | None:
    """The remote span context an incoming request's ``traceparent`` names, or None."""
    if "traceparent" not in headers:
        return None
    ctx = trace.get_current_span(_PROPAGATOR.extract(headers)).get_span_context()
    return ctx if ctx.is_valid else None
