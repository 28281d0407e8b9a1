"""Same seed, same run: the trace digest is identical byte for byte - within one process, and
across processes with different hash seeds (so no set or dict of str/bytes order leaks in)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations import derive
from simulations.runner import run

ROOT = Path(__file__).resolve().parents[2]


def digest(seed: int, scenario: str, n: int = 6, duration: float = 40.0) -> str:
    return run(derive(seed, n, duration, scenario)).digest


@pytest.mark.parametrize("scenario", ["chaos", "crash", "lossy"])
def test_same_seed_same_digest_in_one_process(scenario):
    assert digest(11, scenario) == digest(11, scenario)


def test_different_seeds_or_scenarios_give_different_digests():
    assert len({digest(1, "steady"), digest(2, "steady"), digest(1, "lossy")}) == 3


def test_the_derived_configuration_is_a_function_of_the_seed():
    a, b = derive(5, 10, 60, "chaos"), derive(5, 10, 60, "chaos")
    assert a.describe() == b.describe() and a.faults
    assert derive(6, 10, 60, "chaos").describe() != a.describe()


def cli(*args: str, hashseed: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run(
        [sys.executable, "-m", "simulations", "run", "--no-progress", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.stdout


def test_the_cli_prints_the_same_configuration_summary_and_digest_across_processes():
    args = ("--seed", "3", "--nodes", "6", "--duration", "40", "--scenario", "chaos")
    one = cli(*args, hashseed="0")
    two = cli(*args, hashseed="12345")
    strip = [line for line in one.splitlines() if not line.startswith("wall time")]
    assert strip == [line for line in two.splitlines() if not line.startswith("wall time")]
    assert "== configuration" in one and "== summary" in one
    digest_lines = [line for line in one.splitlines() if line.startswith("trace digest")]
    assert len(digest_lines) == 1 and len(digest_lines[0].split("= ")[1]) == 32
    assert digest_lines[0].split("= ")[1] == digest(3, "chaos", 6, 40.0)
