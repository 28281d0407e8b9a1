"""Storage faults over many seeds (CI runs a fixed handful: tests/simulations/test_sim_power_cuts.py
and test_sim_storage_faults.py).

* ``power_cuts_full_*``: ``simulations.power_cuts.power_cut_run`` under ``synchronous = FULL``
  (the agent's): seeds that failed (must be 0), power cuts taken, mid-operation ones, files torn,
  acknowledged writes lost (must be 0), seconds per run.
* ``power_cuts_normal_lost``: the same seeds under ``NORMAL`` (corrosion's setting), restart checks
  only: acknowledged writes lost per run.
* ``chunked_with_queries_failed``: ``agent_load.chunked_run`` seeds (subscriptions hosted, the
  bookkeeping checked after every event) that failed (must be 0).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import Report, parse_args

from simulations import SimulationFailure
from simulations.agent_load import chunked_run
from simulations.power_cuts import power_cut_run

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: p.add_argument("--seeds", type=int, default=40, help="seeds per scenario"),
    )
    seeds = range(1000, 1000 + (8 if args.quick else args.seeds))
    out = Report(args.json)
    failed, totals, t0 = [], {"cuts": 0, "mid": 0, "torn": 0, "lost": 0}, time.perf_counter()
    for seed in seeds:
        try:
            run = power_cut_run(seed, files_dir=SHM)
        except SimulationFailure as exc:
            failed.append(seed)
            out.info(str(exc).splitlines()[1])
            continue
        totals["cuts"] += run.cuts
        totals["mid"] += run.mid_operation
        totals["torn"] += run.torn
        totals["lost"] += run.lost_acked
    per_run = (time.perf_counter() - t0) / len(seeds)
    out.metric("power_cuts_full_failed", len(failed), "seeds", "0", seeds=len(seeds))
    out.metric("power_cuts_full_cuts", totals["cuts"], "cuts", "-", mid_operation=totals["mid"],
               torn=totals["torn"])  # fmt: skip
    out.metric("power_cuts_full_lost_acked", totals["lost"], "writes", "0")
    out.metric("power_cuts_run_time", per_run, "s/run", "-")
    lost = 0
    for seed in seeds:
        run = power_cut_run(seed, synchronous="NORMAL", check_convergence=False, files_dir=SHM)
        lost += run.lost_acked
    out.metric("power_cuts_normal_lost", lost / len(seeds), "writes/run", "-")
    chunk_failed = []
    for seed in seeds:
        try:
            chunked_run(seed, files_dir=SHM)
        except SimulationFailure:
            chunk_failed.append(seed)
    out.metric("chunked_with_queries_failed", len(chunk_failed), "seeds", "0",
               seeds=len(seeds))  # fmt: skip
    if failed or chunk_failed:
        out.info(f"failing seeds: power cuts {failed}, chunked {chunk_failed}")


if __name__ == "__main__":
    main()
