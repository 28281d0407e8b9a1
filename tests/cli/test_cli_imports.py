"""The ``corrosion`` command's client commands start without loading the agent."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return set(out.stdout.split())


def test_the_cli_module_does_not_load_the_agent() -> None:
    loaded = _modules_after("import corrosion.ops.cli")
    assert "corrosion.ops.cli" in loaded
    heavy = {"corrosion.agent", "corrosion.runtime.agent", "corrosion.core.replication", "swim"}
    assert not heavy & loaded


def test_the_package_names_load_on_first_use() -> None:
    loaded = _modules_after("import corrosion")
    assert "corrosion.runtime.agent" not in loaded
    loaded = _modules_after("from corrosion import Agent, Client, Config, TransactionError")
    assert {"corrosion.agent", "corrosion.surfaces.client", "corrosion.config"} <= loaded
    out = subprocess.run(
        [sys.executable, "-c", "import corrosion; corrosion.NoSuchThing"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "module 'corrosion' has no attribute 'NoSuchThing'" in out.stderr


def test_every_public_name_has_a_home() -> None:
    import corrosion

    assert sorted(corrosion.__all__) == sorted(corrosion._HOMES)
    assert all(getattr(corrosion, name) is not None for name in corrosion.__all__)
