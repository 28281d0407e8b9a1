"""Exhaustive exploration of the real replication core (simulations.explore): how many states a
bounded model has, how deep it goes, and how fast the explorer gets through it.

* ``explore_default_*``: the default configuration (what CI runs): two nodes, node 0 writes a row
  and a two-chunk transaction, node 1 writes the same row; one loss, one duplicate, one crash,
  one sync round per node.
* ``explore_large_*``: a larger model (skipped with ``--quick``): three nodes (node 0 as above,
  nodes 1 and 2 a row each), one loss, one duplicate, one crash, one sync round per node, the
  apply loop as its own step (so a crash can lose a queued chunk).
* ``explore_snapshot_vs_replay``: the two ways of reaching a state to expand, on one small model -
  restoring a copy of each node (serialized SQLite database + pickled core) against re-running
  the action prefix from the initial state (stateless, as a visited-hash-only search would).
  The ratio is replay's wall time over snapshot's (above 1: snapshots are faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import Report, parse_args

from simulations.explore import ExploreConfig, ExploreResult, default_writes, explore


def large() -> ExploreConfig:
    three = default_writes(3)
    return ExploreConfig(
        nodes=3,
        writes=(three[0], three[1][:1], three[2][:1]),
        losses=1,
        duplicates=1,
        crashes=1,
        syncs=1,
    )


def comparison() -> ExploreConfig:
    return ExploreConfig(
        writes=(default_writes(2)[0], ()),
        losses=1,
        duplicates=1,
        crashes=1,
        syncs=1,
        apply_inline=True,
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
    args = parse_args(__doc__.splitlines()[0])
    report = Report(args.json)
    failed = run(report, "default", ExploreConfig()).violation is not None
    small = comparison()
    snap = run(report, "compare_snapshot", small)
    again = run(report, "compare_replay", ExploreConfig(**{**small.__dict__, "mode": "replay"}))
    report.metric(
        "explore_snapshot_vs_replay",
        again.elapsed / snap.elapsed,
        "x",
        "replay wall / snapshot wall",
        same_states=snap.states == again.states,
    )
    if not args.quick:
        failed |= run(report, "large", large()).violation is not None
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
