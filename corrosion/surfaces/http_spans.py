"""A server span around an HTTP endpoint, continuing the caller's W3C ``traceparent``: the root
of a write's trace on the node that took it (``POST /v1/transactions``)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.requests import Request
from starlette.responses import Response

from ..runtime import tracing

Endpoint = Callable[[Request], Awaitable[Response]]
_SERVER = SpanKind.SERVER  # (looked up once: an enum member lookup is slow, this is per request)


def server_span(
    method: str, route: str, *, transaction: bool = False
) -> Callable[[Endpoint], Endpoint]:
    """Decorate a starlette endpoint: with tracing on, each request is a ``SERVER`` span
    ``"{method} {route}"`` (child of the request's ``traceparent``, when it has one), with the
    method, route and status code; off, the endpoint is called as it is. ``transaction``: the
    request is one local transaction, which the runtime describes on this span
    (``tracing.request_span``) rather than on a child of its own."""
    name = f"{method} {route}"

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def traced(request: Request) -> Response:
            if not tracing.enabled():
                return await endpoint(request)
            scope = request.scope
            parent = None
            for key, _value in scope["headers"]:  # (ASGI: lower-case names)
                if key == b"traceparent":
                    parent = tracing.extract_span_context(request.headers)
                    break
            span = tracing.start_span(
                name,
                parent,
                _SERVER,
                {"http.request.method": scope["method"], "http.route": route},
            )
            # Not made current: nothing reads the current span while a request is served (a
            # transaction finds its request's span through ``tracing.request_span``), and
            # setting the context costs as much as the span's attributes
            token = tracing.request_span.set(span) if transaction else None
            try:
                response = await endpoint(request)
            except BaseException as exc:  # recorded on the span (ERROR), which ends
                span.__exit__(type(exc), exc, exc.__traceback__)
                raise
            finally:
                if token is not None:
                    tracing.request_span.reset(token)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
            return response

        return traced

    return wrap
