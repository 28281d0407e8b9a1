"""Helpers shared by the orchestrator tests."""

from __future__ import annotations

import anyio
from support import require

from orchestrator.drivers import runc_available
from orchestrator.hosts import hosts_unavailable


def require_runc() -> None:
    """Skip a test of the runc driver where it cannot run, or fail it when the CI requires runc
    (CORROSION_REQUIRE_RUNC=1)."""
    require(runc_available(), "CORROSION_REQUIRE_RUNC")


def require_netns() -> None:
    """Skip a test that needs network namespaces (root and iproute2's ip) where they cannot be
    made, or fail it when the CI requires them (CORROSION_REQUIRE_NETNS=1)."""
    require(hosts_unavailable(), "CORROSION_REQUIRE_NETNS")


class CrrPublisher:
    """What the agent's /v1/transactions does, in-process: one transaction on a CRR database."""

    def __init__(self, conn) -> None:
        self.conn = conn

    async def execute(self, statements):
        await anyio.lowlevel.checkpoint()
        with self.conn:
            for sql, params in statements:
                self.conn.execute(sql, params)
