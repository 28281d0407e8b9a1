"""Helpers shared by the orchestrator tests."""

from __future__ import annotations

import socket

import anyio


def free_port() -> int:
    """A loopback port free right now (for a server the test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CrrPublisher:
    """What the agent's /v1/transactions does, in-process: one transaction on a CRR database."""

    def __init__(self, conn) -> None:
        self.conn = conn

    async def execute(self, statements):
        await anyio.lowlevel.checkpoint()
        with self.conn:
            for sql, params in statements:
                self.conn.execute(sql, params)
