"""Exhaustive exploration of the real replication core (simulations.explore): how many states a
bounded model has, how deep it goes, and how fast the explorer gets through it.

* ``explore_default_*``: the default configuration (what CI runs): two nodes, node 0 writes a
  two-chunk transaction, node 1 a row; one loss (or sync stream cut), one crash-restart and one
  sync round, anywhere.
* ``explore_large_*`` (skipped with ``--quick``): two writes per node (node 0 the two-chunk
  transaction then the row node 1 also writes: a conflict; node 1 that row then its own), the
  same faults; bounded at 100000 states unless ``--max-states`` says otherwise (0: no bound).
  All of it is 244447 states, 13 steps deep: 12 minutes on a quiet 2-core machine.
* ``explore_snapshot_vs_replay``: the two ways of reaching a state to expand, on one small model
  (every state up to depth 5 of a two-chunk write with a loss, a duplicate, a crash and a sync):
  restoring copies of the nodes that differ (serialized SQLite database + pickled core) against
  re-running the action prefix from the initial state (stateless, as a visited-hash-only search
  does). The ratio is replay's wall time over snapshot's (above 1: snapshots are faster).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import Report, parse_args

from simulations.explore import ExploreConfig, ExploreResult, default_writes, explore


def large(max_states: int | None) -> ExploreConfig:
    return ExploreConfig(writes=default_writes(2, per_node=2), max_states=max_states)


def comparison() -> ExploreConfig:
    return ExploreConfig(
        writes=(default_writes(1)[0], ()),
        losses=1,
        duplicates=1,
        crashes=1,
        syncs=1,
        max_depth=5,
    )


def run(report: Report, name: str, config: ExploreConfig) -> ExploreResult:
    result = explore(config)
    report.info(f"{name}: {result.summary()}")
    if result.violation is not None:
        report.info(result.violation.report())
    verdict = "ok" if result.violation is None else result.violation.invariant
    report.metric(f"explore_{name}_states", result.states, "states", "-", verdict=verdict)
    report.metric(f"explore_{name}_depth", result.depth, "steps", "-")
    report.metric(f"explore_{name}_states_per_s", result.states_per_s, "states/s", "-")
    report.metric(f"explore_{name}_s", result.elapsed, "s", "-", transitions=result.transitions)
    return result


def main() -> int:
    def extra(p: Any) -> None:
        p.add_argument(
            "--max-states",
            type=int,
            default=100_000,
            help="bound the large model (default 100000; 0: explore all of it)",
        )

    args = parse_args(__doc__.splitlines()[0], extra)
    report = Report(args.json)
    failed = run(report, "default", ExploreConfig()).violation is not None
    small = comparison()
    snap = run(report, "compare_snapshot", small)
    again = run(report, "compare_replay", dataclasses.replace(small, mode="replay"))
    report.metric(
        "explore_snapshot_vs_replay",
        again.elapsed / snap.elapsed,
        "x",
        "replay wall / snapshot wall",
        same_states=snap.states == again.states,
    )
    if not args.quick:
        bound = args.max_states or None
        failed |= run(report, "large", large(bound)).violation is not None
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
