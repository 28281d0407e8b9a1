"""``corrosion --version``: the installed distribution's version, before anything else is
looked at; from a source tree without metadata, pyproject.toml's marked ``+source``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from corrosion import version as version_module
from corrosion.ops.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_version_is_the_installed_distributions() -> None:
    result = _run("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"corrosion {metadata.version('corrosion')}\n"


def test_version_needs_no_config_and_wins_over_a_subcommand() -> None:
    # the default config does not exist here: --version is answered before it is looked for
    result = _run("-c", "/nonexistent/config.toml", "--version", "exec", "SELECT 1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("corrosion ")
    assert "error" not in result.output


def test_the_console_entry_point_prints_it() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corrosion", "--version"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=True,
    )  # fmt: skip
    assert out.stdout == f"corrosion {metadata.version('corrosion')}\n"


def _not_installed(name: str) -> str:
    raise metadata.PackageNotFoundError(name)


def test_a_source_tree_without_metadata_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(version_module.metadata, "version", _not_installed)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert version_module.package_version() == f"{project['version']}+source"
    result = _run("--version")
    assert result.stdout == f"corrosion {project['version']}+source\n"

    # no pyproject, another project's, or one without a version: unknown, never a guess
    assert version_module.package_version(tmp_path / "missing.toml") == "unknown"
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "something-else"\nversion = "9.9"\n')
    assert version_module.package_version(other) == "unknown"
    other.write_text('[project]\nname = "corrosion"\ndynamic = ["version"]\n')
    assert version_module.package_version(other) == "unknown"
    other.write_text("not toml [")
    assert version_module.package_version(other) == "unknown"
