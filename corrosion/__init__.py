"""The corrosion agent: CRDT SQLite replicated over SWIM gossip, with corrosion's HTTP API.

    async with corrosion.Agent(corrosion.Config.load("config.toml")) as agent:
        await agent.execute(["INSERT INTO t VALUES (1, 'x')"])
        async for row in agent.query("SELECT * FROM t"):
            print(row)

The package is layered, each layer importing only those below it (checked by import-linter):

- ``corrosion.core``: the sans-IO replication core and the SQLite store it drives; the simulator
  hosts exactly this.
- ``corrosion.runtime``: the core on real sockets and threads (``AgentRuntime``).
- ``corrosion.surfaces``: the HTTP API, admin socket, metrics endpoint and HTTP client.
- ``corrosion.agent``: ``Agent``, the runtime with its servers.
- ``corrosion.ops``: the ``corrosion`` command, devcluster, backup.

``config``, ``logs``, ``errors`` and ``addresses`` are shared by all of them.
"""

from .agent import Agent
from .config import Config, ConfigError
from .errors import CorrosionError
from .runtime.results import (
    ExecResult,
    MemberInfo,
    QueryError,
    QueryTimeout,
    TransactionError,
    TransactionRefused,
    TransactionTimeout,
)
from .surfaces.client import (
    AgentUnreachable,
    AsyncClient,
    Client,
    ClientError,
    Rejected,
    SubscriptionLost,
    Unauthorized,
)

__all__ = [
    "Agent",
    "AgentUnreachable",
    "AsyncClient",
    "Client",
    "ClientError",
    "Config",
    "ConfigError",
    "CorrosionError",
    "ExecResult",
    "MemberInfo",
    "QueryError",
    "QueryTimeout",
    "Rejected",
    "SubscriptionLost",
    "TransactionError",
    "TransactionRefused",
    "TransactionTimeout",
    "Unauthorized",
]
