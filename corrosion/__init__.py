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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Where each public name lives. They are imported on first use (PEP 562), so that importing a
# part of the package (``corrosion.config``, the ``corrosion`` command's client commands) does
# not load the whole agent: ``import corrosion.ops.cli`` took 0.45 s with it.
_HOMES = {
    "Agent": ".agent",
    "Config": ".config",
    "ConfigError": ".config",
    "CorrosionError": ".errors",
    **dict.fromkeys(
        (
            "ExecResult",
            "MemberInfo",
            "QueryError",
            "QueryTimeout",
            "TransactionError",
            "TransactionRefused",
            "TransactionTimeout",
        ),
        ".runtime.results",
    ),
    **dict.fromkeys(
        (
            "AgentUnreachable",
            "AsyncClient",
            "Client",
            "ClientError",
            "Rejected",
            "SubscriptionLost",
            "Unauthorized",
        ),
        ".surfaces.client",
    ),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'corrosion' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


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
