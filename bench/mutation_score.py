"""The mutation score of the cores: how many small bugs planted in the code their fast tests catch.

Tool: mutmut (3.x). Chosen over cosmic-ray because it is the more actively kept of the two (a
release every few weeks in 2025-26), and because it is fast enough for a 2-core machine: it runs
the selected tests once to learn which tests reach which function, then runs, for each mutant,
only those tests, in a process forked from one that has already imported everything, the
mutant switched on by a trampoline (no re-import, no file rewrite per mutant). cosmic-ray
rewrites the module and starts the test command afresh for every mutant (seconds each here).

Each module below is run in a copy of the source tree (a temporary directory; mutmut writes its
``mutants/`` there), with its own targeted test files, so a mutant costs a fraction of a second.
The score is ``killed / (mutants - equivalent)``: killed counts mutants a test failed on (or that
made a test time out or crash); survivors and mutants no selected test reaches count against
it. Equivalent mutants (a change no behaviour can show) are listed in
``bench/mutation_equivalent.txt``, one per line with the reason.

    python3 bench/mutation_score.py --list
    python3 bench/mutation_score.py --module core-ranges --module orch-steplog
    python3 bench/mutation_score.py --all --time-limit 600 --survivors /tmp/survivors

Needs the ``mutation`` extra (``pip install -e '.[mutation]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("crdt", "swim", "corrosion", "orchestrator", "simulations")
EQUIVALENT = Path(__file__).resolve().parent / "mutation_equivalent.txt"
TARGET = 0.85


@dataclass(frozen=True)
class Module:
    files: tuple[str, ...]  # what is mutated
    tests: tuple[str, ...]  # the fast tests that must catch it


MODULES = {
    "crdt-merge": Module(
        ("crdt/merge.py",),
        (
            "tests/crdt/test_crdt_merge.py",
            "tests/crdt/test_crdt_local.py",
            "tests/crdt/test_crdt_schema.py",
            "tests/crdt/test_crdt_gcpause.py",  # merge_changesets
            "tests/crdt/test_crdt_convergence.py",  # deletes and resurrections between replicas
            "tests/crdt/test_crdt_merge_edges.py",
            "tests/crdt/test_crdt_merge_paths.py",  # bulk vs change-by-change paths, reads
            "tests/crdt/test_crdt_merge_compact.py",  # CompactChanges into merge_changesets
        ),
    ),
    "crdt-triggers": Module(
        ("crdt/triggers.py",),
        (
            "tests/crdt/test_crdt_local.py",
            "tests/crdt/test_crdt_merge.py",
            "tests/crdt/test_crdt_schema.py",
            "tests/crdt/test_crdt_trigger_differential.py",  # against cr-sqlite (node)
        ),
    ),
    "core-ranges": Module(
        ("corrosion/core/ranges.py", "corrosion/core/bookie.py"),
        ("tests/core/test_core_bookkeeping.py",),
    ),
    "core-changeset": Module(
        ("corrosion/core/changeset.py",),
        ("tests/core/test_core_changeset.py",),
    ),
    "swim-core": Module(
        ("swim/core.py",),
        (
            "tests/swim/test_swim_rules.py",
            "tests/swim/test_swim_probe.py",
            "tests/swim/test_swim_dissemination.py",
            "tests/swim/test_swim_core_edges.py",
        ),
    ),
    "orch-engine": Module(
        ("orchestrator/engine.py",),
        # the engine's own fast tests on a real step log; test_orch_resume_random (the whole
        # service, seconds per run) stays out: with it a surviving mutant cost 5x as long
        (
            "tests/orchestrator/test_orch_engine.py",
            "tests/orchestrator/test_orch_engine_edges.py",
            "tests/orchestrator/test_orch_logging.py",
            "tests/orchestrator/test_orch_tracing.py",
        ),
    ),
    "orch-steplog": Module(
        ("orchestrator/steplog.py",),
        (
            "tests/orchestrator/test_orch_steplog.py",
            "tests/orchestrator/test_orch_steplog_compaction.py",
            "tests/orchestrator/test_orch_engine.py",
            "tests/orchestrator/test_orch_resume_random.py",
        ),
    ),
}

# mutmut's exit codes (mutmut.stats.status_by_exit_code): a test failed, or the mutant hung or
# crashed the run, or the type check refused it
KILLED = {1, 3, 24, -24, 36, 37, 152, 255, -9, -11}
SURVIVED = {0}
NO_TESTS = {5, 33}


@dataclass
class Score:
    module: str
    total: int = 0
    killed: int = 0
    survived: int = 0
    no_tests: int = 0
    not_run: int = 0  # the time limit came first
    equivalent: int = 0
    seconds: float = 0.0
    survivors: tuple[str, ...] = ()

    @property
    def counted(self) -> int:
        return self.total - self.equivalent - self.not_run

    @property
    def score(self) -> float:
        return self.killed / self.counted if self.counted else 0.0

    def line(self) -> str:
        partial = f", {self.not_run} not run (time limit)" if self.not_run else ""
        return (
            f"{self.module:15s} {100 * self.score:5.1f}% killed  ({self.killed}/{self.counted}: "
            f"{self.survived} survived, {self.no_tests} reached by no test, "
            f"{self.equivalent} equivalent excluded{partial}; {self.seconds:.0f} s)"
        )


def equivalent_mutants(path: Path = EQUIVALENT) -> dict[str, str]:
    """``mutant name -> why it is equivalent`` (a line without a reason is an error)."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, note = line.partition(" ")
        if not note.strip():
            raise SystemExit(f"{path}:{n}: {name} needs a note saying why it is equivalent")
        out[name] = note.strip()
    return out


def _prepare(work: Path, module: Module) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, work / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    config = (ROOT / "pyproject.toml").read_text()
    config += "\n[tool.mutmut]\n" + "\n".join(
        [
            f"source_paths = {json.dumps(list(PACKAGES))}",
            f"only_mutate = {json.dumps(list(module.files))}",
            f"pytest_add_cli_args_test_selection = {json.dumps(list(module.tests))}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]',
        ]
    )
    (work / "pyproject.toml").write_text(config + "\n")


def _mutmut(work: Path, args: list[str], timeout: float | None) -> bool:
    """Run ``mutmut args`` in ``work``; False if ``timeout`` passed first (the run is stopped:
    its process group, which this function started)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    # tests that wait on a run fail after this many seconds (tests/orchestrator/conftest.py's
    # hang_deadline): a mutant that makes a run never finish costs that, not mutmut's timeout
    env.setdefault("CORROSION_TEST_DEADLINE", "5")
    with open(work / "mutmut.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mutmut", *args],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return False


def _results(work: Path, name: str, module: Module, equivalent: dict[str, str]) -> Score:
    score = Score(name)
    survivors = []
    for file in module.files:
        meta = work / "mutants" / (file + ".meta")
        if not meta.exists():
            raise SystemExit(f"{name}: mutmut produced no results (see {work / 'mutmut.log'})")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for mutant, code in sorted(codes.items()):
            score.total += 1
            if mutant in equivalent:
                score.equivalent += 1
                if code in KILLED:
                    print(f"note: {mutant} is listed as equivalent but was killed", flush=True)
            elif code is None:
                score.not_run += 1
            elif code in KILLED:
                score.killed += 1
            elif code in NO_TESTS:
                score.no_tests += 1
                survivors.append(mutant)
            else:
                score.survived += 1
                survivors.append(mutant)
    score.survivors = tuple(survivors)
    return score


SHOW = """
import sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
for name in sys.argv[1:]:
    print(f"# {name}")
    print(get_diff_for_mutant(name, path=find_mutant(name).path))
"""


def _write_survivors(work: Path, score: Score, directory: Path) -> Path:
    """Each survivor's diff (what ``mutmut show`` prints, in one process), for reading or for
    the equivalents file."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"survivors-{score.module}.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(out, "w") as f:
        subprocess.run(
            [sys.executable, "-c", SHOW, *score.survivors], cwd=work, env=env, stdout=f, check=False
        )
    return out


def run_module(
    name: str,
    time_limit: float | None,
    jobs: int,
    survivors: Path | None,
    equivalent: dict[str, str],
    keep: Path | None = None,
) -> Score:
    module = MODULES[name]
    missing = [p for p in module.files + module.tests if not (ROOT / p).exists()]
    if missing:
        raise SystemExit(f"{name}: missing {', '.join(missing)}")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # SQLite's fsyncs cost nothing
    with contextlib.ExitStack() as stack:
        if keep is None:
            tmp = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=f"mutation-{name}-", dir=base)
            )
            work = Path(tmp)
        else:
            work = keep / name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        _prepare(work, module)
        t0 = time.monotonic()
        finished = _mutmut(work, ["run", "--max-children", str(jobs)], time_limit)
        score = _results(work, name, module, equivalent)
        score.seconds = time.monotonic() - t0
        if not finished:
            print(f"{name}: stopped at the time limit ({time_limit:.0f} s)", flush=True)
        if survivors is not None and score.survivors:
            print(f"{name}: survivors in {_write_survivors(work, score, survivors)}", flush=True)
    return score


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", action="append", choices=sorted(MODULES), help="repeatable")
    p.add_argument("--all", action="store_true", help="every module (an hour or more)")
    p.add_argument("--list", action="store_true", help="the modules, their files and tests")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per module")
    p.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    p.add_argument("--survivors", type=Path, help="write each module's surviving diffs here")
    p.add_argument("--json", action="store_true", help="one JSON object per module")
    p.add_argument("--keep", type=Path, help="run in KEEP/<module> and leave it (mutmut's files)")
    args = p.parse_args()
    if args.list:
        for name, m in MODULES.items():
            print(f"{name}: mutates {', '.join(m.files)}; tests {', '.join(m.tests)}")
        return 0
    names = sorted(MODULES) if args.all else args.module
    if not names:
        p.error("give --module NAME (repeatable), --all or --list")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        p.error("mutmut is not installed: pip install -e '.[mutation]'")
    equivalent = equivalent_mutants()
    scores = []
    for name in names:
        score = run_module(name, args.time_limit, args.jobs, args.survivors, equivalent, args.keep)
        scores.append(score)
        if args.json:
            fields = {k: v for k, v in vars(score).items() if k != "survivors"}
            print(json.dumps({**fields, "score": round(score.score, 4)}), flush=True)
        else:
            print(score.line(), flush=True)
    skipped = sorted(set(MODULES) - set(names))
    if skipped and not args.json:
        print(f"not run: {', '.join(skipped)}")
    return 0 if all(s.score >= TARGET and not s.not_run for s in scores) else 1


if __name__ == "__main__":
    raise SystemExit(main())
