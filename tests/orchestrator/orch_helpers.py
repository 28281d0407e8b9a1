"""Helpers shared by the orchestrator tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import require

from corrosion.runtime import tracing
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


class SpanRecorder:
    """The spans ended while it is open: corrosion's tracer provider for this process (what an
    agent installs from its config) with an in-memory exporter instead of OTLP."""

    def __init__(self) -> None:
        assert not tracing.active(), "a tracer provider was left installed"
        self.exporter = InMemorySpanExporter()
        self.handle = tracing.start_tracing(None, "orchestrator-tests", exporter=self.exporter)

    def get_finished_spans(self) -> list[ReadableSpan]:
        self.handle.force_flush()  # the provider batches spans in a thread
        return list(self.exporter.get_finished_spans())

    def close(self) -> None:
        self.handle.shutdown()


def spans_named(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    """The spans whose name starts with ``prefix``, in the order they started."""
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_time or 0)


def slow_start_run(log: Any) -> tuple[threading.Event, threading.Event, Callable[[], None]]:
    """Make ``log.start_run`` (a step log's) block in its worker thread until released: returns
    ``(writing, release, restore)``, ``writing`` set once a START is being written, ``restore``
    putting the real ``start_run`` back."""
    writing, release = threading.Event(), threading.Event()
    start_run = log.start_run

    def slow(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        release.wait(60)
        return start_run(*args, **kwargs)

    def restore() -> None:
        log.start_run = start_run

    log.start_run = slow
    return writing, release, restore
