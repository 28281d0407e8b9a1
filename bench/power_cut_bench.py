"""Storage faults over many seeds (CI runs a fixed handful: tests/simulations/test_sim_power_cuts.py
and test_sim_storage_faults.py).

* ``power_cuts_full_*``: ``simulations.power_cuts.power_cut_run`` under ``synchronous = FULL``
  (the agent's): seeds that failed (must be 0), power cuts taken, mid-operation ones, files torn,
  acknowledged writes lost (must be 0), seconds per run.
* ``power_cuts_normal_lost``: the same seeds under ``NORMAL`` (corrosion's setting), restart checks
  only: acknowledged writes lost per run.
* ``chunked_with_queries_failed``: ``agent_load.chunked_run`` seeds (subscriptions hosted, the
  bookkeeping checked after every event) that failed (must be 0).

With ``--orch``, the orchestrator world instead (``simulations.orch_power_cuts``: step logs and
agent stores on the faulty disk, ``--duration`` seconds of operations per seed; CI runs seeds 0-5
in tests/simulations/test_sim_orch_power_cuts.py):

* ``orch_power_cuts_failed``: seeds with a violation (must be 0), and the violations;
* ``orch_power_cuts_cuts``: power cuts taken, mid-operation ones, files torn, and cuts that
  took a step log's unsynced writes (lost or torn);
* ``orch_power_cuts_runs``: runs started, resumed after a restart, failed (a reboot loses the
  driver's instances: a restart whose instance went fails, as the worker reports);
* ``orch_power_cuts_redone``: completed steps started again (must be 0); step logs checked;
* ``orch_power_cuts_run_time``: seconds per seed.
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
from simulations.orch_power_cuts import orch_power_cut_run
from simulations.power_cuts import power_cut_run

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def orch_sweep(seeds: range, duration: float, out: Report) -> None:
    failed, violations, t0 = [], 0, time.perf_counter()
    totals = dict.fromkeys(("cuts", "mid", "torn", "steplog", "runs", "resumed", "failed_runs",
                            "redone", "logs"), 0)  # fmt: skip
    for seed in seeds:
        try:
            run = orch_power_cut_run(seed, duration=duration)
        except SimulationFailure as exc:
            failed.append(seed)
            violations += len(exc.violations)
            out.info(f"seed {seed}: {exc.violations[0]}")
            continue
        totals["cuts"] += run.cuts
        totals["mid"] += run.mid_operation
        totals["torn"] += run.torn
        totals["steplog"] += run.steplog_losses
        totals["runs"] += run.counts.get("run_started", 0)
        totals["resumed"] += run.resumed
        totals["failed_runs"] += run.counts.get("run failed", 0)
        totals["redone"] += run.redone
        totals["logs"] += run.logs_checked
    per_run = (time.perf_counter() - t0) / len(seeds)
    out.metric("orch_power_cuts_failed", len(failed), "seeds", "0", seeds=len(seeds),
               violations=violations, duration=duration)  # fmt: skip
    out.metric("orch_power_cuts_cuts", totals["cuts"], "cuts", "-", mid_operation=totals["mid"],
               torn=totals["torn"], took_steplog_writes=totals["steplog"])  # fmt: skip
    out.metric("orch_power_cuts_runs", totals["runs"], "runs", "-", resumed=totals["resumed"],
               failed=totals["failed_runs"])  # fmt: skip
    out.metric("orch_power_cuts_redone", totals["redone"], "steps", "0",
               logs_checked=totals["logs"])  # fmt: skip
    out.metric("orch_power_cuts_run_time", per_run, "s/run", "-")
    if failed:
        out.info(f"failing seeds: {failed}")


def main() -> None:
    def extra(p):
        p.add_argument("--seeds", type=int, default=40, help="seeds per scenario")
        p.add_argument("--orch", action="store_true", help="the orchestrator world's sweep")
        p.add_argument("--duration", type=float, default=60.0,
                       help="--orch: seconds of operations and faults per seed")  # fmt: skip

    args = parse_args(__doc__.splitlines()[0], extra)
    seeds = range(1000, 1000 + (8 if args.quick else args.seeds))
    out = Report(args.json)
    if args.orch:
        orch_sweep(seeds, 30.0 if args.quick else args.duration, out)
        return
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
