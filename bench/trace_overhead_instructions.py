"""Tracing overhead counted in instructions (valgrind's callgrind), immune to the machine's load:
the instructions per applied version (``apply``) or per ``POST /v1/transactions`` (``txn``) with
tracing on, exporting OTLP to a receiver in another process, ÷ off.

Each mode runs twice in a process of its own under callgrind (every thread counted), with
``--small`` and ``--small + --step`` units; the per-unit figure is the difference ÷ ``--step``,
so start-up, imports and the final flush cancel out. The batch processor's schedule delay is
set out of reach (``OTEL_BSP_SCHEDULE_DELAY``), so the exports are the same in every run: one
per 2048 spans and one at shutdown; ``--step`` 2048 (the default) puts exactly one more export,
a full one, in the larger run. The rounds are trace_overhead_bench.py's (the same frames, the
same agent). Slow: a few minutes per path. What the agent does on its timers meanwhile counts
too, and a run lasts as long as the machine's load makes it: on a busy machine the per-unit
figures move by several percent from run to run (take ``--repeat`` 3 or more, and compare
builds in one run). ``--path spans`` counts the apply spans' tracing work alone (no agent, no
HTTP: ``spans_round``), and ``--path txn-spans`` a request's (``txn_spans_round``), which no
timer or load moves: the figures to compare builds with.

    python3 bench/trace_overhead_instructions.py --path apply
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
from trace_overhead_bench import (
    ROOT,
    apply_round,
    source_frames,
    start_mode,
    start_sink,
    txn_round,
)

VALGRIND = "/usr/bin/valgrind"


def child(mode: str, path: str, n: int, base: Path, sink_url: str, name: str) -> None:
    """One round of ``n`` units in ``mode``, by an agent in ``base / name`` (run under callgrind
    by the parent)."""

    if path == "spans":
        spans_round(mode, n)
        return
    if path == "txn-spans":
        txn_spans_round(mode, n)
        return

    async def run() -> None:
        handle = start_mode(mode, sink_url)
        try:
            if path == "apply":
                with open(base / "frames.pickle", "rb") as f:
                    frames = pickle.load(f)[mode]  # the same load in every run
                await apply_round(base, name, frames[:n], handle.force_flush)
            else:
                await txn_round(base, name, n, handle.force_flush)
        finally:
            handle.shutdown()

    anyio.run(run)


def spans_round(mode: str, n: int) -> None:
    """The agent's tracing work alone for ``n`` traced versions of 10 rows, without the agent:
    noting each chunk's arrival (``AgentSpans.queued``), its apply span (``applied``, batches of
    100) and, on, encoding the spans (an exporter that encodes and sends nothing). Off, tracing
    is not started: what is left is making the inputs, which the difference removes."""
    import random
    from types import SimpleNamespace

    from corrosion.core.changeset import Changeset
    from corrosion.core.store import ApplyResult
    from corrosion.runtime.spans import AgentSpans

    handle = start_encoding(mode)
    rng = random.Random(1)
    actor = rng.randbytes(16)
    spans = AgentSpans(rng.randbytes(16))
    rows = tuple((i,) for i in range(10))
    for start in range(0, n, 100):
        batch = [
            Changeset(actor, v, rows, (0, 9), 9, 1, v, b"\0" + rng.randbytes(24) + b"\1")
            for v in range(start + 1, min(start + 100, n) + 1)
        ]
        spans.queued([SimpleNamespace(item=x) for x in batch], "127.0.0.1:4567", "broadcast")
        spans.applied(batch, ApplyResult(applied=[(x.actor, x.version) for x in batch]))
    handle.force_flush()
    handle.shutdown()


def txn_spans_round(mode: str, n: int) -> None:
    """The tracing work alone of ``n`` ``POST /v1/transactions`` as trace_overhead_bench.py
    makes them (one row, no peers), without the agent or HTTP: corrosion's server span
    (``http_spans.server_span``) around an endpoint describing a transaction as the runtime
    does (``AgentSpans.transaction``, ``committed``, ``broadcast``) and, on, encoding the
    spans (an exporter that encodes and sends nothing). Off, tracing is not started: what is
    left is calling the endpoint, which the difference removes."""
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import Request
    from starlette.responses import Response

    from corrosion.runtime.spans import AgentSpans
    from corrosion.surfaces.http_spans import server_span

    handle = start_encoding(mode)
    spans = AgentSpans(bytes(range(16)))
    versions = iter(range(100_000, 100_000 + n))  # an agent that has taken writes already

    async def endpoint(request: Request) -> Response:
        with spans.transaction() as span:
            commit = SimpleNamespace(version=next(versions), last_seq=1, changes=[0, 1])
            spans.committed(span, commit)  # type: ignore[arg-type]
            spans.broadcast(span, commit, [])  # type: ignore[arg-type]
        return Response(status_code=200)

    traced = server_span("POST", "/v1/transactions", transaction=True)(endpoint)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/transactions",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json")],
    }

    async def run() -> None:
        for _ in range(n):
            await traced(Request(scope))

    asyncio.run(run())
    handle.force_flush()
    handle.shutdown()


def start_encoding(mode: str) -> Any:
    """Tracing off (``off``), or on with corrosion's exporter encoding each batch and sending
    nothing."""
    from corrosion.runtime import tracing

    if mode == "off":
        return tracing.start_tracing(None, "corrosion-bench")
    from corrosion.runtime.otlp_export import SpanExporter, encode_request

    class EncodeOnly(SpanExporter):
        def export(self, spans: Any) -> Any:
            records = getattr(self, "_records", None)  # (a build without records)
            encode_request(spans, records) if records else encode_request(spans)

    url = "http://127.0.0.1:9/v1/traces"
    return tracing.start_tracing(None, "corrosion-bench", exporter=EncodeOnly(endpoint=url))


def count(mode: str, path: str, n: int, base: Path, sink_url: str, run: int) -> int:
    """The instructions of a process running ``child(mode, path, n)`` (``run``: its number)."""
    name = f"{path}-{mode}-{n}-{run}"
    out = base / f"callgrind.{name}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONHASHSEED": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "100000000",
    }
    subprocess.run(
        [
            VALGRIND,
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            mode,
            path,
            str(n),
            str(base),
            sink_url,
            name,
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
            out.unlink()
            return total
    raise RuntimeError(f"no instruction total in {out}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        mode, path, n, base, sink_url, name = sys.argv[2:8]
        child(mode, path, int(n), Path(base), sink_url, name)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", choices=("apply", "txn", "spans", "txn-spans"), default="apply")
    p.add_argument("--small", type=int, default=300, help="units in the smaller run")
    p.add_argument("--step", type=int, default=2048, help="units more in the larger run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode (the median counts)")
    p.add_argument("--jobs", type=int, default=2, help="callgrind processes at a time")
    args = p.parse_args()
    sink, sink_url = start_sink()
    try:
        assert sink.stdout is not None and sink.stdin is not None
        with tempfile.TemporaryDirectory(prefix="trace-instr-") as tmp:
            base = Path(tmp)
            sizes = (args.small, args.small + args.step)
            if args.path == "apply":
                frames = source_frames(base, sizes[1])
                with open(base / "frames.pickle", "wb") as f:
                    pickle.dump({"off": frames["off"], "otlp": frames["otlp"]}, f)
            runs = [
                (mode, n) for _ in range(args.repeat) for mode in ("off", "otlp") for n in sizes
            ]
            with ThreadPoolExecutor(args.jobs) as pool:
                counts = list(
                    pool.map(
                        lambda i: count(runs[i][0], args.path, runs[i][1], base, sink_url, i),
                        range(len(runs)),
                    )
                )
        per_unit: dict[str, list[float]] = {"off": [], "otlp": []}
        for i in range(0, len(runs), 2):
            per_unit[runs[i][0]].append((counts[i + 1] - counts[i]) / args.step)
        median = {mode: statistics.median(xs) for mode, xs in per_unit.items()}
        for mode, xs in per_unit.items():
            print(
                f"{args.path} {mode}: {median[mode]:,.0f} instructions per unit "
                f"(runs: {', '.join(f'{x:,.0f}' for x in xs)})"
            )
        extra = median["otlp"] - median["off"]
        if args.path == "spans":  # off is only the making of the inputs: no ratio
            print(f"the apply spans' tracing work: {extra:,.0f} instructions per version")
        elif args.path == "txn-spans":
            print(f"the request span's tracing work: {extra:,.0f} instructions per request")
        else:
            ratio = median["otlp"] / median["off"]
            print(
                f"trace_overhead_{args.path} (instructions): {ratio:.4f}  (+{extra:,.0f} per unit)"
            )
        sink.stdin.close()
        print(f"spans the OTLP receiver got: {sink.stdout.readline().strip()}")
    finally:
        sink.kill()
        sink.wait()


if __name__ == "__main__":
    main()
