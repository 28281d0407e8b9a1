"""The orchestrator as an agent extension (``[orchestrator]`` in the agent's config).

The agent hosts an ``Orchestrator``: it serves the Machines API next to its own HTTP API (behind
the agent's bearer token), adds the ``machines`` table to its schema, and publishes each
worker's machine rows through its own local transactions: they replicate like any other write,
and a proxy on another worker reads them from its local replica.

The CLI finds ``from_config`` through the entry point ``orchestrator`` of the group
``corrosion.extensions``; an application embedding the agent passes it itself:
``Agent(config, extensions=[from_config(config.orchestrator)])``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup
from starlette.routing import BaseRoute

from corrosion.config import ConfigError
from corrosion.runtime.extensions import ExtensionHost, MetricFamily

from .api import routes
from .config import OrchestratorConfig, build_orchestrator
from .publish import MACHINES_SCHEMA, Statement
from .service import Orchestrator
from .workers import Announcer, WorkerInfo, api_url_for, worker_routes


class AgentPublisher:
    """The orchestrator's publisher seam, writing through the local agent."""

    def __init__(self, agent: ExtensionHost) -> None:
        self.agent = agent

    async def execute(self, statements: Sequence[Statement]) -> Any:
        return await self.agent.execute(list(statements))


class OrchestratorExtension:
    """An ``Orchestrator`` run by the agent (``corrosion.extensions.AgentExtension``)."""

    name = "orchestrator"
    section = "orchestrator"
    schema = MACHINES_SCHEMA

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.orch: Orchestrator | None = None
        self.announcer: Announcer | None = None
        self._heartbeat: anyio.CancelScope | None = None

    async def start(self, agent: ExtensionHost, tg: TaskGroup) -> None:
        # the orchestrator runs its own task group, entered here and exited in close()
        publisher = AgentPublisher(agent)
        orch = build_orchestrator(self.config, publisher=publisher)
        await orch.__aenter__()
        self.orch = orch
        configured = self.config.api_url

        def api_url() -> str:
            """orchestrator.api_url, else the agent's first API address: as bound once the API
            serves, as configured before that unless its port is 0 ("" then: no gateway is sent
            to port 0; the next heartbeat has the real one)."""
            if configured:
                return configured
            addrs = list(agent.api_addrs) or list(agent.config.api.addrs)
            return "" if addrs and addrs[0][1] == 0 else api_url_for(addrs)

        info = WorkerInfo(
            id=orch.worker, region=orch.region, capacity=self.config.capacity, api_url=api_url()
        )
        self.announcer = Announcer(
            publisher, info, clock=orch.clock, api_url=api_url,
            cordon_path=self.config.machines_path / "_worker" / "cordon.json",
        )  # fmt: skip
        self._heartbeat = anyio.CancelScope()
        await self.announcer.beat()  # gateways may place here as soon as start returns
        tg.start_soon(self._beat_forever)

    async def _beat_forever(self) -> None:
        assert self.announcer is not None and self._heartbeat is not None
        with self._heartbeat:
            await self.announcer.run()

    def routes(self) -> list[BaseRoute]:
        if self.orch is None:
            return []
        # the agent's bearer-token check guards every route
        extra = worker_routes(self.announcer) if self.announcer is not None else []
        return [*routes(self.orch), *extra]

    def metric_families(self) -> list[MetricFamily]:
        """The orchestrator's metrics, served with the agent's ``/metrics``."""
        return [] if self.orch is None else self.orch.metrics.families(self.orch)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.announcer is not None:
            with anyio.move_on_after(5):  # gateways stop placing here before the heartbeat ages
                await self.announcer.drain()
        orch, self.orch = self.orch, None
        if orch is not None:
            await orch.__aexit__(None, None, None)


def from_config(section: Mapping[str, Any]) -> OrchestratorExtension:
    """The extension for an ``[orchestrator]`` table; ``corrosion.ConfigError`` naming the key
    when the table is invalid (so the agent refuses to start, in one line)."""
    try:
        config = OrchestratorConfig.from_mapping(section)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        if not message.startswith(("[orchestrator]", "orchestrator.")):  # names the table
            message = f"[orchestrator]: {message}"
        raise ConfigError(message) from None
    return OrchestratorExtension(config)
