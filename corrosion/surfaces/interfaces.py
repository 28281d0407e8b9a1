"""What the servers in front of the agent use of it: the HTTP API (``api``), the admin socket
(``admin``), the metrics endpoint (``metrics``) and the PostgreSQL server (``pg``). Each depends
on its Protocol here, not on ``agent.py``: the agent imports them to serve them, so importing it
back would be a cycle, and a narrow interface shows what each of them may touch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import anyio

import swim

from ..config import Config
from ..core.pending_schema import PendingSchema
from ..core.replication import Replicator
from ..core.store import Store
from ..runtime.lag import LagWindow
from ..runtime.reads import Reads
from ..runtime.results import ExecResult, MemberInfo, UpdateWatch
from ..runtime.schema_flow import SchemaFlow
from ..runtime.subscriptions import Subscriptions
from ..runtime.telemetry import Telemetry


class AgentHealth(Protocol):
    """The numbers ``/v1/health``, the admin ``health`` command and metrics report."""

    config: Config
    pending_schema: PendingSchema
    not_in_schema: list[str]
    schema: SchemaFlow  # the cluster schema

    @property
    def actor_id(self) -> bytes: ...

    def gaps(self) -> int: ...

    def alive_members(self) -> int: ...

    def queue_size(self) -> int: ...

    def p99_lag(self) -> float: ...

    def members(self) -> list[MemberInfo]: ...


class ApiAgent(AgentHealth, Protocol):
    """What the HTTP API serves."""

    subscriptions: Subscriptions

    async def execute(self, statements: Sequence[Any], *, timeout: Any = ...) -> ExecResult: ...

    def query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, batch: int = ...,
        timeout: Any = ...,
    ) -> AsyncIterator[tuple[Any, ...]]: ...  # fmt: skip

    def query_stream(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, batch: int = ...,
        timeout: Any = ..., encode: Callable[[list[tuple], int], bytes] | None = ...,
    ) -> AsyncIterator[tuple[str, Any]]: ...  # fmt: skip

    def watch_updates(self, table: str, *, buffer: int = ...) -> UpdateWatch: ...

    def extra_routes(self) -> list[Any]: ...


class AdminAgent(AgentHealth, Protocol):
    """What the admin socket's commands act on (its maintenance commands: the runtime's parts,
    through ``corrosion.runtime.maintenance``)."""

    subscriptions: Subscriptions
    store: Store | None
    swim: swim.SwimNode | None
    replicator: Replicator | None
    db_lock: anyio.Lock

    async def reload_schema(self, *, allow_destructive: bool = False) -> list[str]: ...

    def sync_state(self) -> dict[str, Any]: ...


class MetricsAgent(AgentHealth, Protocol):
    """What ``/metrics`` reads: the health numbers and the counters of the agent's parts."""

    events: Any  # corrosion.runtime.events.AgentEvents
    telemetry: Telemetry
    lag: LagWindow
    reads: Reads
    subscriptions: Subscriptions
    pg_servers: list[Any]  # corrosion.surfaces.pg.PgServer: api.pg.addr's, with their counters
    extensions: list[Any]  # corrosion.runtime.extensions.AgentExtension: may export metrics
    peers: Any  # corrosion.runtime.peers.PeerStreams (None until started): its send queues
    store: Store | None
    replicator: Replicator | None
    swim: swim.SwimNode | None
    reaper: Any  # corrosion.runtime.tombstones.Reaper; None: db.tombstone_gc is off


class PgAgent(Protocol):
    """What the PostgreSQL server uses of the agent."""

    config: Config

    async def execute(self, statements: Sequence[Any], *, timeout: Any = ...) -> ExecResult: ...

    def query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, batch: int = ...,
        timeout: Any = ...,
    ) -> AsyncIterator[tuple[Any, ...]]: ...  # fmt: skip

    def query_stream(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, batch: int = ...,
        timeout: Any = ..., interruptible: bool = ...,
    ) -> AsyncIterator[tuple[str, Any]]: ...  # fmt: skip

    async def describe(self, sql: str) -> list[tuple[str, str | None]] | None: ...
