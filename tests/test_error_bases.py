"""Each package has one error base, exported from its ``__init__``, and every exception class the
package defines derives from it, so a caller can catch "anything swim raised" in one clause.

Found by walking every module of each package, so a new exception class that forgets its base
fails here. ``BaseException`` subclasses that are not ``Exception``s (the simulator's
``ProcessKilled``, which must unwind through ``except Exception`` like ``KeyboardInterrupt``)
are signals, not errors, and are left out.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

BASES = {
    "crdt": "CrdtError",
    "swim": "SwimError",
    "corrosion": "CorrosionError",
    "orchestrator": "OrchestratorError",
    "simulations": "SimulationError",
}


def exception_classes(package: str) -> list[type[Exception]]:
    """Every Exception subclass defined (not just imported) in a module of ``package``."""
    root = importlib.import_module(package)
    names = [package] + [
        info.name
        for info in pkgutil.walk_packages(root.__path__, f"{package}.")
        if info.name.rpartition(".")[2] != "__main__"  # running it is the CLI, not an import
    ]
    found = []
    for name in names:
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception):
                found.append(cls)
    return found


@pytest.mark.parametrize("package", sorted(BASES))
def test_every_exception_class_derives_from_the_package_base(package):
    base = getattr(importlib.import_module(package), BASES[package])
    assert BASES[package] in importlib.import_module(package).__all__
    classes = exception_classes(package)
    assert base in classes
    strays = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, base)]
    assert strays == [], f"exception classes of {package} not derived from {base.__name__}"


def test_config_errors_stay_value_errors():
    """The per-package ConfigErrors keep ValueError, which their callers catch."""
    from corrosion.config import ConfigError as CorrosionConfigError
    from orchestrator.config import ConfigError as OrchestratorConfigError
    from swim.config import ConfigError as SwimConfigError

    for cls in (CorrosionConfigError, OrchestratorConfigError, SwimConfigError):
        assert issubclass(cls, ValueError), cls
