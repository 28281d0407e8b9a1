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


def resume_redoes_last_completed_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run resumed from its step log forgets the last step it completed (as an engine that
    replayed the log one COMPLETE short would), so that step runs a second time."""
    from orchestrator.engine import Engine

    original = Engine._execute

    async def execute(self, live):
        if live.resumed and live.state.completed:
            live.state.completed.pop()
        await original(self, live)

    monkeypatch.setattr(Engine, "_execute", execute)


def steplog_not_synced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step log commits with ``synchronous = NORMAL`` (the WAL is synced only at
    checkpoints), so a START or COMPLETE the engine was told of can vanish with the power."""
    from orchestrator.steplog import MachineLog

    opened = MachineLog._db

    def normal(self):
        conn = opened(self)
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    monkeypatch.setattr(MachineLog, "_db", normal)
