"""Helpers shared by the orchestrator tests."""

from __future__ import annotations

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import require

from orchestrator.drivers import runc_available
from orchestrator.hosts import hosts_unavailable


def require_runc() -> None:
    """Skip a test of the runc driver where it cannot run, or fail it when the CI requires runc
    (CORROSION_REQUIRE_RUNC=1)."""
    require(runc_available(), "CORROSION_REQUIRE_RUNC")


def require_netns() -> None:
    """Skip a test that needs network namespaces (root and iproute2's ip) where they cannot be
    made, or fail it when the CI requires them (CORROSION_REQUIRE_NETNS=1)."""
    require(hosts_unavailable(), "CORROSION_REQUIRE_NETNS")


class CrrPublisher:
    """What the agent's /v1/transactions does, in-process: one transaction on a CRR database."""

    def __init__(self, conn) -> None:
        self.conn = conn

    async def execute(self, statements):
        await anyio.lowlevel.checkpoint()
        with self.conn:
            for sql, params in statements:
                self.conn.execute(sql, params)


class SpanRecorder(InMemorySpanExporter):
    """Keeps the spans ended while ``recording`` (off between tests: the provider stays)."""

    recording = False

    def export(self, spans):
        if not self.recording:
            return SpanExportResult.SUCCESS
        return super().export(spans)


_recorder: SpanRecorder | None = None


def span_recorder() -> SpanRecorder:
    """The recorder of this test process's spans (the ``spans`` fixture turns it on). Installed
    once: OpenTelemetry takes one global tracer provider per process, so an SDK provider already
    installed gets the recorder added instead."""
    global _recorder
    if _recorder is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
            assert trace.get_tracer_provider() is provider, "another tracer provider is installed"
        _recorder = SpanRecorder()
        provider.add_span_processor(SimpleSpanProcessor(_recorder))
    return _recorder


def spans_named(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    """The spans whose name starts with ``prefix``, in the order they started."""
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_time or 0)
