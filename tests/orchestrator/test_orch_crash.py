"""Crash tests: the orchestrator process is SIGKILLed at random steps of create, start, stop,
restart, cordon and destroy runs, restarted (and killed again) until it finishes.

Checked after every scenario: every run finished (succeeded); per run, the steps ran in order and
after each crash the run resumed at the step in flight or the next one (no earlier step ran
twice), told it was a restart; every machine is in the state its operations promised, with a
live process exactly for started machines; destroyed machines' databases were archived; no
instance directory or shim process is left behind. The seed of a failing scenario is in the
assertion message. ``ORCH_CRASH_ITERATIONS`` raises the number of scenarios (soak).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import random
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest
from support import wait_for_sync

from orchestrator.drivers import ProcessDriver, RuncDriver
from orchestrator.drivers.supervised import SHIM
from orchestrator.steplog import RunStatus
from orchestrator.store import MachineStore

WORKER = Path(__file__).with_name("orch_crash_worker.py")
ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = int(os.environ.get("ORCH_CRASH_ITERATIONS", "0"))


def run_child(base: Path, mode: str, kind: str, seed: int, kill_at: int | None, delay: float):
    """Run the worker; SIGKILL it at its ``kill_at``-th step after READY. Returns (finished,
    final states or None)."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}  # the packages, and tests/support
    with open(base / "worker.log", "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(base), mode, kind, str(seed)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    lines: queue.Queue[bytes | None] = queue.Queue()

    def reader() -> None:
        for line in iter(proc.stdout.readline, b""):
            lines.put(line)
        lines.put(None)

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    ready, steps, final, done = mode == "resume", 0, None, False
    try:
        while True:
            line = lines.get(timeout=120)
            if line is None:
                break
            if line == b"READY\n":
                ready = True
            elif line.startswith(b"STEP ") and ready:
                steps += 1
                if kill_at is not None and steps == kill_at:
                    if delay:
                        threading.Event().wait(delay)
                    proc.kill()
                    proc.wait()
                    with open(base / "journal", "ab") as j:
                        j.write(b"CRASH\n")
                    return False, None
            elif line.startswith(b"FINAL "):
                final = json.loads(line[6:])
            elif line == b"DONE\n":
                done = True
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"worker hung; see {base / 'worker.log'}") from None
    finally:
        # Close the pipe only once the reader is done with it: closing it under a blocked
        # readline makes the reader thread fail. A machine the worker started may still hold
        # the pipe open; then the daemon reader is left to end with it.
        reading.join(timeout=10)
        if not reading.is_alive():
            proc.stdout.close()
    rc = proc.wait(timeout=60)
    assert rc == 0 and done, f"worker failed ({rc}): {(base / 'worker.log').read_text()[-3000:]}"
    return True, final


def shims_for(base: Path) -> set[str]:
    """Instance ids with a shim process alive under ``base`` (a scan of /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(SHIM).encode() in argv:
                d = argv[argv.index(str(SHIM).encode()) + 1].decode()
                if d.startswith(str(base)):
                    found.add(Path(d).name)
    return found


def check_journal(base: Path, runs: dict[str, list[str]], seed: int) -> int:
    """Verify step order and resume points; returns how many crashes the journal shows."""
    segment = 0
    seen: dict[str, list[tuple[int, int, bool, int]]] = {}
    for line in (base / "journal").read_text().splitlines():
        if line == "CRASH":
            segment += 1
            continue
        _, run_id, _mid, _action, step, restart, retry = line.split()
        assert run_id in runs, (seed, line)
        seen.setdefault(run_id, []).append(
            (segment, runs[run_id].index(step), restart == "1", int(retry))
        )
    for run_id, entries in seen.items():
        names = runs[run_id]
        assert {i for _, i, _, _ in entries} == set(range(len(names))), (seed, run_id, entries)
        for (seg0, i0, _, r0), (seg1, i1, restart1, r1) in itertools.pairwise(entries):
            if seg1 == seg0:  # same process: strictly forward, or a retry of the same step
                assert i1 == i0 + 1 or (i1 == i0 and r1 > r0), (seed, run_id, names, entries)
            else:  # resumed after a crash: the step in flight or the next one, as a restart
                assert i0 <= i1 <= i0 + 1, (seed, run_id, names, entries)
                assert restart1, (seed, run_id, entries)
    return segment


async def _cleanup(base: Path, kind: str) -> None:
    cls = ProcessDriver if kind == "process" else RuncDriver
    await cls(base / "instances").destroy_all()


def scenario(tmp_path: Path, kind: str, seed: int) -> int:
    rng = random.Random(seed)
    base = tmp_path / f"s{seed}"
    base.mkdir()
    try:
        finished, final = run_child(
            base, "fresh", kind, seed, rng.randint(1, 20), rng.random() * 0.004
        )
        restarts = 0
        while not finished:
            restarts += 1
            assert restarts < 20, seed
            kill = rng.randint(1, 20) if rng.random() < 0.5 else None
            finished, final = run_child(base, "resume", kind, seed, kill, rng.random() * 0.004)
        promised = json.loads((base / "submitted.json").read_text())

        store = MachineStore(base / "machines", lock=False)
        runs: dict[str, list[str]] = {}
        instance_ids: dict[str, set[str]] = {}
        for mid, state in promised.items():
            if state == "destroyed":
                assert mid not in final, seed
                log = store.restore_archived(mid, base / f"{mid}.restored")
            else:
                assert final[mid]["state"] == state, (seed, mid, final[mid], promised)
                want = "running" if state == "started" else "exited"
                assert final[mid]["instance"] == want, (seed, mid, final[mid])
                log = store.log(mid)
            assert log.active_runs() == [], seed
            # the worker compacts all but the last finished run after each run, so a crash just
            # before that leaves one more; a destroyed machine is compacted before it is archived
            assert log.sizes()["runs"] <= (1 if state == "destroyed" else 2), seed
            for run in log.timeline():  # compacted runs too
                assert run["status"] == RunStatus.SUCCEEDED, (seed, mid, run)
                steps, fins = run["steps"], run["finalizers"]
                runs[run["run_id"]] = [*steps, *(f"finally:{f}" for f in fins)]
            instance_ids[mid] = {log.read_doc()["instance_id"]}
            log.close()
        store.close()
        crashes = check_journal(base, runs, seed)
        # nothing leaked: instance dirs only for live machines, shims only for started ones
        live = {final[m]["instance_id"] for m in final}
        left = {p.name for p in (base / "instances").iterdir() if not p.name.startswith("_")}
        assert left == live, (seed, left, live)
        started = [m for m in final if final[m]["state"] == "started"]
        assert len(shims_for(base)) == len(started), seed
        return crashes
    finally:
        anyio.run(_cleanup, base, kind)
        wait_for_sync(lambda: not shims_for(base), 10, f"seed {seed}: the shims to exit")


@pytest.mark.slow
def test_sigkill_at_random_steps_process_driver(tmp_path):
    iterations = ITERATIONS or 24
    crashes = sum(scenario(tmp_path, "process", seed) for seed in range(iterations))
    assert crashes >= iterations  # every scenario crashed at least once


@pytest.mark.slow
@pytest.mark.usefixtures("runc_required")
def test_sigkill_at_random_steps_runc_driver(tmp_path):
    iterations = max(2, (ITERATIONS or 24) // 3)
    crashes = sum(scenario(tmp_path, "runc", 1000 + seed) for seed in range(iterations))
    assert crashes >= iterations
