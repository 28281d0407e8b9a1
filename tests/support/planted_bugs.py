"""Bugs planted in the real code by tests that check a checker can see them (the simulator's
and the real-socket chaos test's)."""

from __future__ import annotations

import pytest

from corrosion.core.store import Store


def seq_bookkeeping_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffered chunk's seq range is booked in memory but never written to
    ``__corro_seq_bookkeeping``: harmless while the node stays up (the version completes, its
    rows go), so the end state is right, but a crash forgets which chunks it held."""
    original = Store._buffer

    def buffer(self, cs):
        original(self, cs)
        self.conn.execute(
            "DELETE FROM __corro_seq_bookkeeping WHERE site_id = ? AND version = ?",
            (cs.actor, cs.version),
        )

    monkeypatch.setattr(Store, "_buffer", buffer)
