"""The Promela model of sync (verification/sync.pml) checked exhaustively by spin: the model
passes, and each mutant of it (a planted bug behind -DMUTANT=k) fails the check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import require

MODEL = Path(__file__).resolve().parents[2] / "verification" / "sync.pml"


def _check(tmp_path: Path, *defines: str) -> str:
    """Run spin -a, gcc and pan (exhaustive safety search, states compressed with COLLAPSE) on
    the model; return pan's report."""
    spin, gcc = shutil.which("spin"), shutil.which("gcc")
    require(
        None if spin else "spin is not installed (scripts/setup-test-deps)",
        "CORROSION_REQUIRE_SPIN",
    )
    require(None if gcc else "gcc is not installed (spin needs it)", "CORROSION_REQUIRE_SPIN")
    assert spin and gcc
    subprocess.run(
        [spin, *defines, "-a", str(MODEL)], cwd=tmp_path, check=True, capture_output=True
    )
    subprocess.run(
        [gcc, "-O2", "-w", "-DSAFETY", "-DCOLLAPSE", "-o", "pan", "pan.c"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    run = subprocess.run(
        ["./pan", "-m100000"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    return run.stdout


@pytest.mark.parametrize(
    "bounds",
    [
        (),  # 3 nodes, 1 writer, 2 versions of 2 chunks
        ("-DN=2", "-DA=2"),  # 2 nodes, both writers: sync states of several actors
        ("-DN=2", "-DV=3"),  # 3 versions
    ],
)
def test_model_has_no_errors(tmp_path: Path, bounds: tuple[str, ...]) -> None:
    report = _check(tmp_path, *bounds)
    assert "Full statespace search" in report, report
    assert "errors: 0" in report, report
    assert "max search depth too small" not in report, report
    assert not (tmp_path / "sync.pml.trail").exists()


@pytest.mark.parametrize(
    "mutant, violated",
    [
        ("1", "held["),  # partial versions not served by sync: never complete
        ("2", "held["),  # gaps left out of the sync state: never filled
        ("3", "rows["),  # chunks merged before their version is complete
    ],
)
def test_mutant_fails_the_check(tmp_path: Path, mutant: str, violated: str) -> None:
    report = _check(tmp_path, f"-DMUTANT={mutant}")
    assert "errors: 1" in report, report
    assert "assertion violated" in report and violated in report, report
    assert (tmp_path / "sync.pml.trail").exists()
