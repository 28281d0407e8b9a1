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
images_path = "/var/lib/corrosion/images"      # runc root filesystems, registry image cache
image_cache_keep = 3              # registry images no machine uses kept (most recently used)
machine_subnet = "10.213.1.0/24"  # each machine in its own netns with an address from here
machine_bridge = "corro0"         # the bridge on this host the machines' veths attach to
volumes_path = "/var/lib/corrosion/volumes"    # config.mounts (default <machines_path>/_volumes)
keep_runs = 50                    # finished runs a machine's step log keeps; older: its history
api_url = "http://10.0.0.5:8080"  # where gateways reach this worker (default: from api.addr)
capacity = 64                     # machines a gateway may place here
max_migrations_per_second = 50    # older step logs migrated in the background (0: only lazily)
```

Without ``machine_subnet`` machines share the host's network (address 127.0.0.1). With it but
without root or iproute2's ``ip`` (or with the fake driver) they do too, and one log line says so.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corrosion.config import unknown_key

from .archive import DirectoryArchive
from .clock import Clock
from .drivers import Driver, FakeDriver, ProcessDriver, RuncDriver
from .drivers.oci import DEFAULT_KEEP
from .errors import InvalidRequestError
from .migrations import DEFAULT_RATE
from .network import MachineNetwork, check_ifname, check_subnet, netns_unavailable
from .publish import Publisher
from .service import DEFAULT_KEEP_RUNS, Orchestrator

DRIVERS = ("fake", "process", "runc")
log = logging.getLogger(__name__)


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
    machine_subnet: str | None = None
    machine_bridge: str = "corro0"
    volumes_path: Path | None = None
    keep_runs: int = DEFAULT_KEEP_RUNS
    api_url: str = ""
    capacity: int = 64
    max_migrations_per_second: float = DEFAULT_RATE
    image_cache_keep: int = DEFAULT_KEEP

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> OrchestratorConfig:
        if not isinstance(section, Mapping):
            raise ConfigError("[orchestrator] must be a table")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:  # the first, with the key it may be a typo of, as for the agent's keys
            raise ConfigError(unknown_key("orchestrator.", unknown[0], known))
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

        subnet = section.get("machine_subnet")
        try:
            subnet = None if subnet is None else str(check_subnet(subnet))
        except ValueError as e:
            raise ConfigError(f"[orchestrator]: machine_subnet: {e}") from None
        try:
            bridge = check_ifname(section.get("machine_bridge", cls.machine_bridge))
        except ValueError as e:
            raise ConfigError(f"[orchestrator]: machine_bridge: {e}") from None
        keep_runs = section.get("keep_runs", cls.keep_runs)
        if isinstance(keep_runs, bool) or not isinstance(keep_runs, int) or keep_runs < 1:
            raise ConfigError("[orchestrator]: keep_runs must be an integer of at least 1")
        api_url = section.get("api_url", "")
        if not isinstance(api_url, str) or (api_url and not api_url.startswith("http")):
            raise ConfigError("[orchestrator]: api_url must be an http:// or https:// URL")
        capacity = section.get("capacity", cls.capacity)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ConfigError("[orchestrator]: capacity must be a whole number >= 0")
        rate = section.get("max_migrations_per_second", cls.max_migrations_per_second)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate >= 0:
            raise ConfigError("[orchestrator]: max_migrations_per_second must be a number >= 0")
        keep = section.get("image_cache_keep", cls.image_cache_keep)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError("[orchestrator]: image_cache_keep must be a whole number >= 0")
        return cls(
            image_cache_keep=keep,
            max_migrations_per_second=float(rate),
            volumes_path=path("volumes_path"),
            keep_runs=keep_runs,
            api_url=api_url.rstrip("/"),
            capacity=capacity,
            machine_subnet=subnet,
            machine_bridge=bridge,
            machines_path=Path(section["machines_path"]),
            archive_path=path("archive_path"),
            driver=driver,
            worker=section.get("worker") or socket.gethostname(),
            region=section.get("region") or cls.region,
            state_path=path("state_path"),
            images_path=path("images_path"),
        )


def _state_path(config: OrchestratorConfig) -> Path:
    return config.state_path or config.machines_path / "_instances"


def build_network(config: OrchestratorConfig) -> MachineNetwork | None:
    """The machines' network for ``machine_subnet``, or None (the host's network), saying why
    in one log line when a subnet was asked for."""
    if config.machine_subnet is None:
        return None
    why = "the fake driver runs nothing" if config.driver == "fake" else netns_unavailable()
    if why is not None:
        log.warning(
            "machine_subnet %s ignored (%s): machines share this host's network",
            config.machine_subnet, why,
        )  # fmt: skip
        return None
    return MachineNetwork(config.machine_subnet, _state_path(config), bridge=config.machine_bridge)


def build_driver(config: OrchestratorConfig, *, clock: Clock | None = None) -> Driver:
    state = _state_path(config)
    if config.driver == "fake":
        return FakeDriver(clock)
    if config.driver == "process":
        return ProcessDriver(
            state, images=config.images_path, image_cache_keep=config.image_cache_keep
        )
    return RuncDriver(state, images=config.images_path, image_cache_keep=config.image_cache_keep)


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
        network=build_network(config),
        volumes_path=config.volumes_path,
        keep_runs=config.keep_runs,
        migration_rate=config.max_migrations_per_second,
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
