"""Helpers shared by the orchestrator tests."""

from __future__ import annotations

import anyio
from support import require

from orchestrator.drivers import runc_available


def require_runc() -> None:
    """Skip a test of the runc driver where it cannot run, or fail it when the CI requires runc
    (CORROSION_REQUIRE_RUNC=1)."""
    require(runc_available(), "CORROSION_REQUIRE_RUNC")


class CrrPublisher:
    """What the agent's /v1/transactions does, in-process: one transaction on a CRR database."""

    def __init__(self, conn) -> None:
        self.conn = conn

    async def execute(self, statements):
        await anyio.lowlevel.checkpoint()
        with self.conn:
            for sql, params in statements:
                self.conn.execute(sql, params)
