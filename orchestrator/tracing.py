"""Traces of machine operations, through the OpenTelemetry API only (superfly/fsm's shapes).

The orchestrator never installs a tracer provider: the process hosting it does, through
:func:`corrosion.runtime.tracing.start_tracing` (``corrosion agent`` from its ``[telemetry]``
section or the ``OTEL_*`` environment, the gateway from the environment), and spans come from
that provider's ``orchestrator`` tracer, or from the API's global one when corrosion installed
none (an embedding application's provider, the tests'). Without either every call here is the
API's no-op, and a ``traceparent`` received is still passed on unchanged.

A machine operation's trace::

    POST /v1/apps/{app}/machines/{machine_id}/stop   the Machines API request (SERVER)
      machine.stop.accept                             START written; its context saved with it
        machine.stop                                  the run, once per process executing it
          machine.stop.mark_stopping                  one span per step attempt
            machines.publish                          the machine's row, then the agent's spans
          machine.stop.stop_instance
        machine.stop  (fsm.resumed = true)            the same run after a crash, next process
          machine.stop.stop_instance  (fsm.restart = true)

The run's START stores the context of its ``accept`` span (``MachineLog``'s ``runs.trace``): a
process resuming the run parents its run span to it, so one trace holds the attempts of every
process that worked on the run. A run started by no request (an instance's exit) starts a trace
of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from corrosion.runtime import tracing as corrosion_tracing

T = TypeVar("T")

# the W3C headers this module reads and writes (a forwarder replaces what it received)
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def tracer() -> Tracer:
    """The orchestrator's tracer (looked up per use: the provider may be installed later)."""
    return corrosion_tracing.tracer("orchestrator")


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (empty when there is none)."""
    carrier: dict[str, str] = {}
    corrosion_tracing.inject(carrier)
    return carrier


def context_from(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context stored by :func:`current_carrier`: a span under it continues its trace (an
    empty context, for an empty carrier, starts a new one)."""
    return corrosion_tracing.extract(carrier) or otel_context.Context()


def inject_headers(headers: MutableMapping[str, str]) -> None:
    """Replace ``headers``' trace context with the current one (a forwarded request joins the
    forwarder's span, not the span the forwarder received)."""
    for name in [k for k in headers if k.lower() in TRACE_HEADERS]:
        del headers[name]
    corrosion_tracing.inject(headers)


def failed(span: Span, error: BaseException | str) -> None:
    """Mark ``span`` failed: the exception recorded as an event, status ERROR."""
    if isinstance(error, BaseException):
        span.record_exception(error)
        error = f"{type(error).__name__}: {error}"
    span.set_status(Status(StatusCode.ERROR, error))


@contextlib.contextmanager
def server_span(
    method: str, route: str, headers: Mapping[str, str], attributes: Mapping[str, Any]
) -> Iterator[Span]:
    """The span of one HTTP request served, current while it is handled: a SERVER span
    continuing the caller's ``traceparent``, or, when an outer server layer already opened the
    request's span (the agent's HTTP API hosting the Machines API), an INTERNAL child of it."""
    if trace.get_current_span().get_span_context().is_valid:
        parent, kind = None, SpanKind.INTERNAL
    else:
        parent = corrosion_tracing.extract(headers) or otel_context.Context()
        kind = SpanKind.SERVER
    attrs = {"http.request.method": method, "http.route": route, **attributes}
    with tracer().start_as_current_span(
        f"{method} {route}", context=parent, kind=kind, attributes=attrs
    ) as span:
        yield span


def responded(span: Span, status: int) -> None:
    """Record an HTTP answer on its span; a server's 5xx is its own failure (a 4xx is the
    caller's)."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


async def detached(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)`` outside any trace: a background task (an exit watcher, a health check
    loop) outlives the request that happened to spawn it and must not join its trace."""
    token = otel_context.attach(otel_context.Context())
    try:
        return await fn(*args)
    finally:
        otel_context.detach(token)
