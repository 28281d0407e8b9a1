"""Running an orchestrator inside the agent (``[orchestrator]`` in the agent's config).

The agent hosts ``orchestrator.Orchestrator`` in its task group, serves the Machines API next to
its own HTTP API, adds the ``machines`` table to its schema, and publishes each worker's machine
rows through its own local transactions: they replicate like any other write, and a proxy on
another worker reads them from its local replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import Agent


class AgentPublisher:
    """The orchestrator's publisher seam, writing through the local agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def execute(self, statements: Sequence[Any]) -> Any:
        return await self.agent.execute(list(statements))


def machines_schema(agent: Agent) -> str | None:
    """The machines table's schema when this agent runs an orchestrator."""
    if agent.config.orchestrator is None:
        return None
    from orchestrator.publish import MACHINES_SCHEMA

    return MACHINES_SCHEMA


class OrchestratorHandle:
    def __init__(self, orch: Any, token: str | None) -> None:
        self.orch = orch
        self._token = token

    def routes(self) -> list[Any]:
        from orchestrator.api import routes

        return routes(self.orch)  # the agent's bearer-token check already guards every route

    async def aclose(self) -> None:
        await self.orch.__aexit__(None, None, None)


async def start_orchestrator(agent: Agent) -> OrchestratorHandle:
    from orchestrator.config import OrchestratorConfig, build_orchestrator

    from .config import ConfigError

    try:
        cfg = OrchestratorConfig.from_mapping(agent.config.orchestrator or {})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    orch = build_orchestrator(cfg, publisher=AgentPublisher(agent))
    await orch.__aenter__()
    return OrchestratorHandle(orch, agent.config.api.bearer_token)
