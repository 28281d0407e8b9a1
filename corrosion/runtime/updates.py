"""Update watches (``/v1/updates``): which rows of a table changed, as they commit.

A watcher gets ``(kind, pk_values)``: ``delete`` when the row's causal length is even (deleted),
``update`` otherwise (inserts included), once per row per transaction, as corrosion's
``/v1/updates`` does. Local writes and applied remote versions alike. A watcher that cannot keep
up is cut off: it must re-read and watch again. Owned by the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

import crdt

from .results import UpdateWatch


class UpdateWatchers:
    """The open watches, by table."""

    def __init__(self) -> None:
        self._by_table: dict[str, list[MemoryObjectSendStream[tuple[str, tuple]]]] = {}

    def __len__(self) -> int:
        """How many tables are watched."""
        return len(self._by_table)

    def watch(self, table: str, buffer: int) -> UpdateWatch:
        """Start watching ``table`` now (the caller checked that it is replicated)."""
        send, receive = anyio.create_memory_object_stream[tuple[str, tuple]](buffer)
        self._by_table.setdefault(table, []).append(send)

        def close() -> None:
            watchers = self._by_table.get(table, [])
            if send in watchers:
                watchers.remove(send)
            if not watchers:
                self._by_table.pop(table, None)
            send.close()

        return UpdateWatch(receive, close)

    def notify(self, changes: Sequence[Any]) -> None:
        """Tell the watchers of each changed table which rows changed."""
        rows: dict[tuple[str, bytes], str] = {}
        for table, pk, _cid, _val, _cv, _dbv, _site, cl, _seq in changes:  # crdt.ChangeRow
            if table in self._by_table:
                rows[(table, pk)] = "delete" if cl % 2 == 0 else "update"
        for (table, pk), kind in rows.items():
            try:
                values = crdt.unpack_pk(pk)
            except crdt.PackError:
                continue
            for send in list(self._by_table.get(table, [])):
                try:
                    send.send_nowait((kind, values))
                except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._by_table[table].remove(send)
                    send.close()
