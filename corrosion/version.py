"""The version of corrosion that is running, for ``corrosion --version`` and ``corro_build_info``.

It is the installed distribution's (``importlib.metadata``, the ``corrosion`` project of
pyproject.toml). Run from a source tree that was never installed there is no metadata; the
version is then pyproject.toml's with ``+source`` (a PEP 440 local label), so the answer still
says which release the code is and that it is not an installed one.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "corrosion"
UNKNOWN = "unknown"

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def package_version(pyproject: Path = _PYPROJECT) -> str:
    """The installed version, else the source tree's (``0.1.0+source``), else ``unknown``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return UNKNOWN
    if project.get("name") != DISTRIBUTION or not isinstance(project.get("version"), str):
        return UNKNOWN
    return f"{project['version']}+source"
