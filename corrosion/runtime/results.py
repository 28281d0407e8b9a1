"""What the agent answers and raises: transaction and query results, their errors, members and
update watches. Apart from ``agent.py`` so that the servers in front of the agent (``api``,
``admin``) and extensions can name these types without importing the agent itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from ..errors import CorrosionError


@dataclass
class ExecResult:
    """Answer of a transaction, in corrosion's shape (``/v1/transactions``)."""

    results: list[dict[str, Any]]
    time: float
    version: int | None
    actor_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "time": self.time,
            "version": self.version,
            "actor_id": self.actor_id,
        }


class TransactionError(CorrosionError):
    """A statement failed; nothing of the transaction was applied."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


class TransactionRefused(TransactionError):
    """A statement does what clients may not do (DDL, ATTACH, internal tables... see
    ``corrosion.sqlguard``); nothing was applied. The message says what to do instead."""


class TransactionTimeout(TransactionError):
    """The statements ran past the transaction's timeout; nothing was applied."""


class QueryError(CorrosionError):
    """A query was refused (not read-only, invalid SQL)."""

    def __init__(self, message: str, *, client_error: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.client_error = client_error


class QueryTimeout(QueryError):
    """The query ran past its timeout and was interrupted."""

    def __init__(self, message: str) -> None:
        super().__init__(message, client_error=False)


@dataclass
class MemberInfo:
    actor_id: str
    addr: str
    peer_addr: str | None
    state: str
    incarnation: int
    is_self: bool = False  # this node (listed first)
    # the cluster schema version it runs, as it advertises it (None: none yet, or unknown)
    schema_version: int | None = None
    schema_hash: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "actor_id": self.actor_id,
            "addr": self.addr,
            "peer_addr": self.peer_addr,
            "state": self.state,
            "incarnation": self.incarnation,
            "self": self.is_self,
            "schema_version": self.schema_version,
            "schema_hash": self.schema_hash,
        }


class UpdateWatch:
    """Changed rows of one table, as ``(kind, pk_values)``; close (or ``async with``) to stop."""

    def __init__(self, receive: Any, close: Any) -> None:
        self._receive = receive
        self._close = close

    def __aiter__(self) -> UpdateWatch:
        return self

    async def __anext__(self) -> tuple[str, tuple]:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._close()
        self._receive.close()

    async def __aenter__(self) -> UpdateWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
