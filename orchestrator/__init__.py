"""flyd and pilot, in Python: durable machine operations over per-machine SQLite step logs.

Layers, bottom up (one concept per module):

* ``steplog`` / ``store`` / ``archive`` — one database per machine, append/scan only; destroyed
  machines' databases are gzipped into an archive store.
* ``engine`` — the durable FSM engine: registered step lists, log-before-next-step, resume at the
  first incomplete step, one active run per (machine, action), retries, halts, finalizers.
* ``drivers`` — pilot's contract: ``FakeDriver``, ``ProcessDriver``, ``RuncDriver``.
* ``operations`` / ``service`` — the machine operations and the service that accepts them
  (``Orchestrator``), composed of ``documents`` (the one path that changes a machine's
  document), ``leases``, ``metadata``, ``waiting`` and ``exits`` (the restart policy's input).
* ``checks`` / ``health`` — health checks: ``config.checks`` and its probes, and running them on
  started machines (results in the document, so published with it).
* ``publish`` — the seam to corrosion: machine rows into a replicated table.
* ``proxy`` — a fly-proxy-like consumer routing HTTP by SQL over a local replica.
* ``api`` — the Machines API (Starlette); ``config`` — building all of it from a config section.
* ``extension`` — the orchestrator as an extension of the corrosion agent that hosts it
  (``[orchestrator]`` in the agent's config).
"""

from .archive import ArchiveStore, DirectoryArchive, MemoryArchive
from .clock import Clock, ManualClock, SystemClock
from .config import OrchestratorConfig, build_orchestrator, create_app_from_config
from .drivers import Driver, FakeDriver, ProcessDriver, RuncDriver
from .engine import Backoff, Engine, EngineObserver, RunError, RunInfo, RunResult, StepContext
from .errors import (
    AbortError,
    AlreadyRunningError,
    OrchestratorError,
    UnrecoverableError,
)
from .publish import MACHINES_SCHEMA, MACHINES_TABLE, MemoryPublisher, Publisher
from .service import Orchestrator
from .steplog import MachineLog
from .store import MachineStore

__all__ = [
    "MACHINES_SCHEMA",
    "MACHINES_TABLE",
    "AbortError",
    "AlreadyRunningError",
    "ArchiveStore",
    "Backoff",
    "Clock",
    "DirectoryArchive",
    "Driver",
    "Engine",
    "EngineObserver",
    "FakeDriver",
    "MachineLog",
    "MachineStore",
    "ManualClock",
    "MemoryArchive",
    "MemoryPublisher",
    "Orchestrator",
    "OrchestratorConfig",
    "OrchestratorError",
    "ProcessDriver",
    "Publisher",
    "RunError",
    "RunInfo",
    "RunResult",
    "RuncDriver",
    "StepContext",
    "SystemClock",
    "UnrecoverableError",
    "build_orchestrator",
    "create_app_from_config",
]
