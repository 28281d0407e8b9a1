"""Tracing overhead: the agent's apply path and transaction path with tracing off, on with a
no-op exporter, and on exporting OTLP/HTTP to a receiver in another process, in the same run.

* ``trace_overhead_apply``: CPU seconds per applied version (10 rows each) with tracing on,
  exporting OTLP, ÷ off. The frames are fed to a running agent as its broadcast stream does
  (``Replicator.handle_frame``, the apply loop: one ``corrosion.apply`` span per version)
  without the socket; on, every version carries a sampled trace context of its own, as when
  every write is traced.
* ``trace_overhead_txn``: CPU seconds per single-row ``POST /v1/transactions`` (the ASGI app
  called in-process: no socket noise; one server span per request, with its attributes and
  ``commit`` event) on ÷ off.

CPU time (``time.process_time``: every thread of this process, the exporter's included; the
receiver runs in a process of its own, as a collector would) is the headline because wall
time here is mostly the disk's (one fsync per commit) and other users of the machine; the
wall-time ratio is beside it, with the no-op exporter's ratio (the spans without their
export) and the ratio when the origin samples 10 % of writes
(``OTEL_TRACES_SAMPLER=traceidratio``). Medians over rounds that alternate the modes (and the
lowest and highest round's own on ÷ off, to show the noise); on the default event loop and on
uvloop where installed. Target: <= 1.05. Off is the default (nothing configured): the SDK is
not even imported.

What "on" costs, per unit (docs/performance.md, Tracing, has the measured figures): for an apply,
remembering the chunk's arrival, queuing its span as one tuple (``tracing.apply_recorder``),
encoding it (``otlp_export``) and its share of an HTTP export; for a request, the same for its
server span (``tracing.start_span``: a ``RecordedSpan`` queued as it is when it ends) with its
attributes and event. bench/trace_overhead_instructions.py counts the same ratios in
instructions (valgrind), which the machine's load does not move.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
import anyio.lowlevel
import httpx
from _common import Report, parse_args
from agent_bench import SCHEMA, config, event_loops

from corrosion import Agent
from corrosion.core.changeset import encode
from corrosion.core.ranges import RangeSet
from corrosion.core.store import Store
from corrosion.runtime import tracing
from corrosion.surfaces.api import asgi_app

ROOT = Path(__file__).resolve().parent.parent
MODES = ("off", "noop", "otlp", "sampled")  # sampled: OTLP, 10 % of the writes traced

# the receiver (tests/support/otlp_receiver.py) in a process of its own, as a collector would be
SINK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from support.otlp_receiver import OtlpReceiver
with OtlpReceiver() as r:
    print(r.url, flush=True)
    sys.stdin.read()
    print(len(r.spans), flush=True)
"""


class NoopExporter:
    """A span exporter that drops what it is given: the SDK's cost alone."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def start_sink() -> tuple[subprocess.Popen[str], str]:
    """The OTLP receiver (``SINK``) in a process of its own, and its URL. Closing its stdin
    makes it print how many spans it got."""
    sink = subprocess.Popen(
        [sys.executable, "-c", SINK, str(ROOT / "tests")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert sink.stdout is not None
    return sink, sink.stdout.readline().strip()


def start_mode(mode: str, sink_url: str) -> tracing.TracingHandle:
    if mode == "off":
        return tracing.start_tracing(None, "corrosion-bench")
    if mode == "noop":
        return tracing.start_tracing(None, "corrosion-bench", exporter=NoopExporter())
    settings = tracing.resolve(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url})
    if mode == "otlp":
        return tracing.start_tracing(settings, "corrosion-bench")
    # the provider reads its sampler from the environment when it is made
    sampler = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    saved = {k: os.environ.get(k) for k in sampler}
    os.environ.update(sampler)
    try:
        return tracing.start_tracing(settings, "corrosion-bench")
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def source_frames(base: Path, versions: int) -> dict[str, list[bytes]]:
    """The frames of ``versions`` versions of 10 rows each by mode: without a trace context
    (off), each with a sampled one of its own, and one in ten with one."""
    src = Store(base / "src.db")
    src.apply_schema(SCHEMA)
    for i in range(versions):
        statements = [
            ("INSERT INTO kv (k, v, n) VALUES (?, ?, ?)", (f"k{i}-{j}", "x" * 20, j))
            for j in range(10)
        ]
        _, commit = src.execute_local(statements, ts=int(time.time() * 1000))
        src.install(commit)
    items = list(src.serve(src.actor_id, RangeSet([(1, versions)]), max_versions=versions))
    src.close()
    rng = random.Random(7)
    plain = [encode(x) for x in items]
    traced = [
        encode(dataclasses.replace(x, trace=b"\0" + rng.randbytes(24) + b"\x01")) for x in items
    ]
    sampled = [t if i % 10 == 0 else p for i, (p, t) in enumerate(zip(plain, traced, strict=True))]
    return {"off": plain, "noop": traced, "otlp": traced, "sampled": sampled}


async def apply_round(
    base: Path, name: str, frames: list[bytes], flush: Callable[[], Any]
) -> tuple[float, float]:
    """Seconds and CPU seconds for a fresh agent to apply ``frames`` fed as by its broadcast
    stream, and to export their spans (``flush``: see ``exported``)."""
    async with Agent(config(base, name, [])) as agent:
        rep, spans = agent.replicator, agent.spans
        target = agent.events.applied_versions + len(frames)
        t, cpu = time.perf_counter(), time.process_time()
        for i, frame in enumerate(frames):
            before = len(rep.queue)
            rep.handle_frame(None, frame, agent._now())
            spans.queued(rep.queue[before:], "bench", "broadcast")
            if i % 100 == 99:
                agent._wake_apply()
                await anyio.lowlevel.checkpoint()
        agent._wake_apply()
        while agent.events.applied_versions < target:
            await agent.wait_applied()
        await exported(flush)
        return time.perf_counter() - t, time.process_time() - cpu


async def exported(flush: Callable[[], Any]) -> None:
    """The round's spans exported before its clocks stop: a round pays for the export of its
    own spans, and for none of the round before (the exporter's thread encoding and sending an
    apply round's thousands of spans while the transactions were timed once made a third of
    the transaction path's measured overhead)."""
    await anyio.to_thread.run_sync(flush)


async def txn_round(base: Path, name: str, n: int, flush: Callable[[], Any]) -> tuple[float, float]:
    """Seconds and CPU seconds for ``n`` single-row transactions through the HTTP API's app,
    and the export of their spans (``flush``)."""
    async with Agent(config(base, name, [], api=True)) as agent:
        transport = httpx.ASGITransport(app=asgi_app(agent))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for i in range(20):  # warm-up
                await client.post("/v1/transactions", json=[f"INSERT INTO kv (k) VALUES ('w{i}')"])
            t, cpu = time.perf_counter(), time.process_time()
            for i in range(n):
                resp = await client.post(
                    "/v1/transactions", json=[f"INSERT INTO kv (k, v) VALUES ('k{i}', 'x')"]
                )
                assert resp.status_code == 200, resp.text
            await exported(flush)
            return time.perf_counter() - t, time.process_time() - cpu


async def measure(
    base: Path, sink_url: str, versions: int, txns: int, rounds: int
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    frames_by_mode = source_frames(base, versions)
    out: dict[str, dict[str, list[tuple[float, float]]]] = {"apply": {}, "txn": {}}
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            handle = start_mode(mode, sink_url)
            try:
                took = await apply_round(
                    base, f"apply-{mode}-{r}", frames_by_mode[mode], handle.force_flush
                )
                out["apply"].setdefault(mode, []).append((took[0] / versions, took[1] / versions))
                took = await txn_round(base, f"txn-{mode}-{r}", txns, handle.force_flush)
                out["txn"].setdefault(mode, []).append((took[0] / txns, took[1] / txns))
            finally:
                await anyio.to_thread.run_sync(handle.shutdown)
    return out


def report_loop(report: Report, suffix: str, results: dict[str, Any]) -> None:
    for path, unit_name in (("apply", "version"), ("txn", "transaction")):
        by_mode = results[path]
        wall = {m: statistics.median(x[0] for x in by_mode[m]) for m in MODES}
        cpu = {m: statistics.median(x[1] for x in by_mode[m]) for m in MODES}
        # each round's own on ÷ off: how much the ratio moves from round to round
        rounds = [on[1] / off[1] for on, off in zip(by_mode["otlp"], by_mode["off"], strict=True)]
        report.metric(
            f"trace_overhead_{path}{suffix}",
            cpu["otlp"] / cpu["off"],
            "ratio",
            "target <= 1.05 (CPU per unit: tracing on, OTLP to a local receiver ÷ off)",
            loop=suffix.lstrip("_") or "asyncio",
            per=unit_name,
            off_cpu_us=round(cpu["off"] * 1e6, 1),
            otlp_cpu_us=round(cpu["otlp"] * 1e6, 1),
            noop_cpu_ratio=round(cpu["noop"] / cpu["off"], 3),
            sampled_10pct_cpu_ratio=round(cpu["sampled"] / cpu["off"], 3),
            rounds_min=round(min(rounds), 3),
            rounds_max=round(max(rounds), 3),
            wall_ratio=round(wall["otlp"] / wall["off"], 3),
            off_wall_us=round(wall["off"] * 1e6, 1),
        )


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    report = Report(args.json)
    versions, txns, rounds = (300, 200, 3) if args.quick else (2000, 1000, 9)
    sink, sink_url = start_sink()
    try:
        assert sink.stdout is not None and sink.stdin is not None
        for suffix, backend, options in event_loops():
            if backend != "asyncio":
                continue  # trio: the same code paths, measured by agent_bench's loops already
            with tempfile.TemporaryDirectory(prefix="trace-bench-") as tmp:
                results = anyio.run(
                    measure,
                    Path(tmp),
                    sink_url,
                    versions,
                    txns,
                    rounds,
                    backend=backend,
                    backend_options=options,
                )
            report_loop(report, suffix, results)
        sink.stdin.close()
        received = sink.stdout.readline().strip()
        report.info(f"spans the OTLP receiver got: {received}")
    finally:
        sink.kill()
        sink.wait()


if __name__ == "__main__":
    main()
