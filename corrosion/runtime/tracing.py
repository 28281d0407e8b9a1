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

import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    TraceFlags,
    Tracer,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..config import ConfigError, OpenTelemetryConfig

log = logging.getLogger("corrosion.tracing")

SCOPE = "corrosion"
_PROPAGATOR = TraceContextTextMapPropagator()
_CONTEXT_VERSION = 0
CONTEXT_BYTES = 26  # version, trace id (16), span id (8), flags

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
        global _provider, _handles
        if self._released:
            return
        self._released = True
        with _lock:
            _handles -= 1
            if _handles > 0:
                return
            provider, _provider = _provider, None
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
    global _provider, _handles
    if settings is None and exporter is None:
        return TracingHandle(False)
    with _lock:
        if _provider is None:
            _provider = _new_provider(settings, service_name, instance_id, attributes, exporter)
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
) -> Any:
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
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint if settings else None)
    # the SDK's own exit hook would flush after the event loop is gone: the holders shut down
    provider = TracerProvider(resource=Resource.create(attrs), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


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
    newer version, a corrupt value: a trace link lost, never an error)."""
    if data is None or len(data) < CONTEXT_BYTES or data[0] != _CONTEXT_VERSION:
        return None
    ctx = SpanContext(
        trace_id=int.from_bytes(data[1:17], "big"),
        span_id=int.from_bytes(data[17:25], "big"),
        is_remote=True,
        trace_flags=TraceFlags(data[25]),
    )
    return ctx if ctx.is_valid else None


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
