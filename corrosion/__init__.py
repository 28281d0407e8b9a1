"""The corrosion agent: CRDT SQLite replicated over SWIM gossip, with corrosion's HTTP API.

    async with corrosion.Agent(corrosion.Config.load("config.toml")) as agent:
        await agent.execute(["INSERT INTO t VALUES (1, 'x')"])
        async for row in agent.query("SELECT * FROM t"):
            print(row)

``corrosion.replication`` is the sans-IO core (broadcast, apply, sync) that the simulator runs;
``corrosion.store`` the database with its bookkeeping; ``corrosion.api`` the ASGI app.
"""

from .agent import (
    Agent,
    ExecResult,
    MemberInfo,
    QueryError,
    QueryTimeout,
    TransactionError,
    TransactionRefused,
    TransactionTimeout,
)
from .config import Config, ConfigError
from .errors import CorrosionError

__all__ = [
    "Agent",
    "Config",
    "ConfigError",
    "CorrosionError",
    "ExecResult",
    "MemberInfo",
    "QueryError",
    "QueryTimeout",
    "TransactionError",
    "TransactionRefused",
    "TransactionTimeout",
]
