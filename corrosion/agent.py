"""``corrosion.Agent``: the runtime that replicates (corrosion.runtime.agent) with the servers in
front of it — the admin socket, the Prometheus endpoint, the HTTP API and the PostgreSQL
protocol — as the config asks.

    async with corrosion.Agent(config) as agent:
        await agent.execute(["INSERT INTO t VALUES (1, 'x')"])
        async for row in agent.query("SELECT * FROM t"):
            ...

The runtime knows nothing of these servers: they see it through the narrow views in
corrosion.surfaces.interfaces, and this module, above both, puts them together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from anyio.abc import TaskGroup

from .addresses import format_addr
from .config import Config
from .runtime.agent import AgentRuntime
from .runtime.events import AgentEvents, Faults
from .runtime.extensions import AgentExtension
from .runtime.listening import listening
from .surfaces.admin import MAX_SOCKET_PATH, start_admin
from .surfaces.api import serve_api
from .surfaces.asgi_server import AsgiServer
from .surfaces.metrics import start_metrics
from .surfaces.pg import PgServer, start_pg

__all__ = ["Agent", "AgentEvents", "Faults"]

log = logging.getLogger("corrosion.agent")


class Agent(AgentRuntime):
    """A corrosion agent: replication, plus the admin socket (always, unless its default path
    is too long), ``/metrics`` (with ``telemetry.prometheus.addr``) and the HTTP API (with
    ``api.addr``, unless ``serve_api`` is false) and the PostgreSQL protocol (``api.pg.addr``,
    unless ``serve_api`` is false)."""

    def __init__(
        self,
        config: Config,
        *,
        seed: int | None = None,
        serve_api: bool = True,
        allow_destructive: bool = False,
        extensions: Sequence[AgentExtension] = (),
    ) -> None:
        super().__init__(
            config, seed=seed, allow_destructive=allow_destructive, extensions=extensions
        )
        self._serve_api = serve_api
        self._api_servers: list[AsgiServer] = []
        self.pg_addrs: list[tuple[str, int]] = []  # api.pg.addr as bound
        self.pg_servers: list[PgServer] = []

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def _start_servers(self, tg: TaskGroup) -> None:
        await self._start_admin(tg)
        cfg = self.config
        if cfg.prometheus_addr is not None:
            with listening("telemetry.prometheus.addr", cfg.prometheus_addr):
                close, self.metrics_addr = await start_metrics(self, tg, cfg.prometheus_addr)
            self._closers.append(close)
        if self._serve_api:
            for host, port in cfg.api.addrs:
                with listening("api.addr", (host, port)):
                    server, bound = await serve_api(self, tg, host, port)
                self._api_servers.append(server)
                self.api_addrs.append(bound)
            for listener in cfg.api.pg:
                with listening("api.pg.addr", listener.addr):
                    close, bound, pg = await start_pg(self, tg, listener)
                self._closers.append(close)
                self.pg_addrs.append(bound)
                self.pg_servers.append(pg)

    def _startup_fields(self) -> dict[str, Any]:
        fields = super()._startup_fields()
        if self.pg_addrs:
            fields["pg_addrs"] = [format_addr(a) for a in self.pg_addrs]
        return fields

    async def _start_admin(self, tg: TaskGroup) -> None:
        path = self.config.admin_socket()
        if self.config.admin_path is None and len(os.fsencode(path)) > MAX_SOCKET_PATH:
            # only the default can be too long (a given admin.path is checked at start-up)
            log.warning(
                "no admin socket: %s is longer than a socket path may be; set admin.path", path
            )
            return
        self._closers.append(await start_admin(self, tg, path))
        self.admin_path = path
        # where it is, wherever the cwd goes next (abspath reads the cwd: no I/O to wait for)
        self._admin_abspath = os.path.abspath(path)  # noqa: ASYNC240

    async def aclose(self) -> None:
        """Stop serving clients first (API, then metrics and admin), then the runtime."""
        servers, self._api_servers = self._api_servers, []
        for server in servers:
            server.close()
        await super().aclose()
