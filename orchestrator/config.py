"""Configuration of an orchestrator (the ``[orchestrator]`` section of ``corrosion agent``'s
TOML), and the factories that build a running service and its Machines API from it.

```toml
[orchestrator]
machines_path = "/var/lib/corrosion/machines"  # one SQLite database per machine (required)
archive_path = "/var/lib/corrosion/archive"    # destroyed machines' databases, gzipped
driver = "process"                             # "fake" | "process" | "runc"
worker = "worker-1"                            # this host's name in the machines table
region = "local"
state_path = "/var/lib/corrosion/instances"    # driver state (instance dirs, runc root)
images_path = "/var/lib/corrosion/images"      # runc root filesystems
```
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archive import DirectoryArchive
from .clock import Clock
from .drivers import Driver, FakeDriver, ProcessDriver, RuncDriver
from .errors import InvalidRequestError
from .publish import Publisher
from .service import Orchestrator

DRIVERS = ("fake", "process", "runc")


class ConfigError(InvalidRequestError, ValueError):
    """The ``[orchestrator]`` section is invalid."""


@dataclass(frozen=True)
class OrchestratorConfig:
    machines_path: Path
    archive_path: Path | None = None
    driver: str = "process"
    worker: str = ""
    region: str = "local"
    state_path: Path | None = None
    images_path: Path | None = None

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> OrchestratorConfig:
        if not isinstance(section, Mapping):
            raise ConfigError("[orchestrator] must be a table")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"[orchestrator]: unknown key(s) {', '.join(unknown)}")
        if not section.get("machines_path"):
            raise ConfigError("[orchestrator]: machines_path is required")
        driver = section.get("driver", cls.driver)
        if driver not in DRIVERS:
            raise ConfigError(f"[orchestrator]: driver must be one of {', '.join(DRIVERS)}")
        for key in ("worker", "region"):
            if not isinstance(section.get(key, ""), str):
                raise ConfigError(f"[orchestrator]: {key} must be a string")

        def path(key: str) -> Path | None:
            value = section.get(key)
            if value is None:
                return None
            if not isinstance(value, str | Path) or not str(value):
                raise ConfigError(f"[orchestrator]: {key} must be a path")
            return Path(value)

        return cls(
            machines_path=Path(section["machines_path"]),
            archive_path=path("archive_path"),
            driver=driver,
            worker=section.get("worker") or socket.gethostname(),
            region=section.get("region") or cls.region,
            state_path=path("state_path"),
            images_path=path("images_path"),
        )


def build_driver(config: OrchestratorConfig, *, clock: Clock | None = None) -> Driver:
    state = config.state_path or config.machines_path / "_instances"
    if config.driver == "fake":
        return FakeDriver(clock)
    if config.driver == "process":
        return ProcessDriver(state)
    return RuncDriver(state, images=config.images_path)


def build_orchestrator(
    config: OrchestratorConfig | Mapping[str, Any],
    *,
    publisher: Publisher | None = None,
    clock: Clock | None = None,
) -> Orchestrator:
    """An Orchestrator (not yet running: ``async with`` it) from a config section."""
    if not isinstance(config, OrchestratorConfig):
        config = OrchestratorConfig.from_mapping(config)
    archive = DirectoryArchive(config.archive_path) if config.archive_path else None
    return Orchestrator(
        machines_path=config.machines_path,
        driver=build_driver(config, clock=clock),
        archive=archive,
        worker=config.worker or socket.gethostname(),
        region=config.region,
        clock=clock,
        publisher=publisher,
    )


def create_app_from_config(
    config: OrchestratorConfig | Mapping[str, Any],
    *,
    publisher: Publisher | None = None,
    token: str | None = None,
):
    """The standalone Machines API app for a config section (its lifespan runs the service)."""
    from .api import create_app

    return create_app(build_orchestrator(config, publisher=publisher), token=token)
