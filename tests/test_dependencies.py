"""Every third-party module the installed packages import is a declared dependency.

A dependency that arrives only through another one (sniffio through trio, from the ``dev``
extra) passes every test and crashes on a user's ``pip install .``. This reads the imports of
every module (at any depth, including the ones inside functions) and compares their
distributions with ``pyproject.toml``: each must be in ``[project] dependencies``, or in an
extra when it is optional (uvloop from ``fast``, matplotlib from ``plot``). The other half, that
the packages really import without the extras, is ``scripts/smoke-fresh-install``'s.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("crdt", "swim", "corrosion", "orchestrator", "simulations")


def _dist_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_dist_name(r) for r in project["dependencies"]}
    extras = {
        extra: {_dist_name(r) for r in reqs}
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    return runtime, extras


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module name -> the places (path:line) that import it."""
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
                        continue
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.setdefault(top, []).append(where)
    return found


def distributions_of(module: str) -> set[str]:
    """The installed distributions providing ``module``; its own name when none is installed
    (an optional dependency that this environment lacks)."""
    dists = importlib.metadata.packages_distributions().get(module) or [module]
    return {_dist_name(d) for d in dists}


def test_every_third_party_import_is_a_declared_dependency() -> None:
    runtime, extras = declared()
    optional = set().union(*extras.values())
    imports = third_party_imports()
    assert "apsw" in imports and "anyio" in imports  # the scan sees the real imports
    undeclared = {
        module: places
        for module, places in imports.items()
        if not distributions_of(module) & (runtime | optional)
    }
    assert not undeclared, "\n".join(
        f"{module} (imported at {', '.join(places)}) is not declared in pyproject.toml: add it "
        "to [project] dependencies, or to an extra if the code works without it"
        for module, places in sorted(undeclared.items())
    )


def test_runtime_dependencies_cover_the_core_imports() -> None:
    """The imports that `pip install .` must satisfy on its own are runtime dependencies, not
    only extras: everything but the known optional speed-ups and tools."""
    runtime, _ = declared()
    only_in_extras = {
        module for module in third_party_imports() if not distributions_of(module) & runtime
    }
    # uvloop: optional event loop; matplotlib: simulations.plot; hypothesis: simulations.strategies;
    # hypercorn: corrosion.asgi_server serving HTTP on trio (the trio extra); trio:
    # corrosion.runtime.threadfeed waking a trio event loop (imported only when running on one)
    assert only_in_extras <= {"uvloop", "matplotlib", "hypothesis", "hypercorn", "trio"}, (
        f"imported but only in an extra: {sorted(only_in_extras)}; a module every user runs "
        "needs it in [project] dependencies (or list it here, with the module that needs it)"
    )


def test_corrosion_loads_nothing_of_the_layers_above_it() -> None:
    """corrosion hosts the orchestrator as an extension found by entry point: importing every
    corrosion module (the CLI and the agent included) and reading a config with an
    ``[orchestrator]`` table loads no orchestrator or simulations module. ``lint-imports``
    checks the imports statically, in CI."""
    code = (
        "import pkgutil, sys, importlib, corrosion\n"
        "for m in pkgutil.walk_packages(corrosion.__path__, 'corrosion.'):\n"
        "    if m.name != 'corrosion.__main__':  # runs the CLI\n"
        "        importlib.import_module(m.name)\n"
        "config = {'db': {'path': 'x.db'}, 'orchestrator': {'machines_path': 'm'}}\n"
        "corrosion.Config.from_mapping(config)  # kept raw, for the extension to read\n"
        "above = ('orchestrator', 'simulations')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in above))\n"
        "print(len([m for m in sys.modules if m.startswith('corrosion.')]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]", f"corrosion loaded modules of a higher layer: {out[0]}"
    assert int(out[1]) > 25  # every module was imported (agent, cli, api, admin, metrics, ...)
