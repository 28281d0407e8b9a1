"""The cycle collector's full pass in an agent process, with and without ``settle_heap``.

* ``gc_full_pass_ratio``: the time of a full collection (``gc.collect()``, the least of five) in
  a running agent after 1,000 transactions, with start-up's heap frozen (``corrosion agent``
  does it: ``corrosion.ops.heap.settle_heap``) ÷ without (an embedded agent), each in a fresh
  process, alternating, medians of the rounds; the full passes the collector made on its own
  during the transactions and their longest pause beside it. On each event loop installed.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _common import Report, parse_args
from agent_bench import config, event_loops

from corrosion import Agent
from corrosion.ops.heap import settle_heap


async def _round(base: Path, frozen: bool, txns: int) -> dict[str, Any]:
    pauses: list[float] = []
    started: list[float] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started.append(time.perf_counter())
            else:
                pauses.append(time.perf_counter() - started.pop())

    async with Agent(config(base, "gc", [])) as agent:
        if frozen:
            settle_heap()
        gc.callbacks.append(watch)
        for i in range(txns):
            await agent.execute(
                [("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (f"k{i}", "x"))]
            )
        gc.callbacks.remove(watch)
        full = []
        for _ in range(5):
            t = time.perf_counter()
            gc.collect()
            full.append(time.perf_counter() - t)
        return {"full": min(full), "passes": len(pauses), "longest": max(pauses, default=0.0)}


def _child(frozen: bool, txns: int, backend: str, options: str) -> None:
    with tempfile.TemporaryDirectory(prefix="gcpause-") as tmp:
        got = anyio.run(
            _round, Path(tmp), frozen, txns, backend=backend, backend_options=json.loads(options)
        )
    print(json.dumps(got))


def _run(frozen: bool, txns: int, backend: str, options: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(int(frozen)),
            str(txns),
            backend,
            json.dumps(options),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "CORROSION_LOG": "warning"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    report = Report(args.json)
    txns, rounds = (300, 1) if args.quick else (1000, 3)
    for suffix, backend, options in event_loops():
        sides: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for r in range(rounds):
            for frozen in (False, True) if r % 2 == 0 else (True, False):
                sides[frozen].append(_run(frozen, txns, backend, options))
        on, off = sides[True], sides[False]
        report.metric(
            f"gc_full_pass_ratio{suffix}",
            statistics.median(a["full"] / b["full"] for a, b in zip(on, off, strict=True)),
            "x",
            "the same agent's full pass without settle_heap",
            loop=suffix.lstrip("_") or "asyncio",
            load=round(os.getloadavg()[0], 2),
            full_pass_ms_frozen=round(statistics.median(a["full"] for a in on) * 1e3, 2),
            full_pass_ms=round(statistics.median(b["full"] for b in off) * 1e3, 2),
            own_passes_frozen=statistics.median(a["passes"] for a in on),
            own_passes=statistics.median(b["passes"] for b in off),
            longest_own_pass_ms_frozen=round(max(a["longest"] for a in on) * 1e3, 2),
            longest_own_pass_ms=round(max(b["longest"] for b in off) * 1e3, 2),
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(bool(int(sys.argv[2])), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
