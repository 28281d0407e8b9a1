"""The cluster schema's rules on real stores (``corrosion.core.cluster_schema``), without the
network: whatever order concurrent proposals and the writes made under them arrive in, every
node ends on the same version, with the same columns and the same rows, and nothing waits."""

from __future__ import annotations

from pathlib import Path

from agent_helpers import apply_now, commit_now
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corrosion.core.changeset import chunk_version
from corrosion.core.cluster_schema import chain, read_versions
from corrosion.core.store import LocalCommit, Store

BASE = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT);"


def with_columns(*cols: str) -> str:
    extra = "".join(f", {c} TEXT" for c in cols)
    return f"CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT{extra});"


def items(store: Store, commit: LocalCommit) -> list:
    return list(
        chunk_version(store.actor_id, commit.version, commit.changes, commit.last_seq, commit.ts, 0)
    )


def propose(store: Store, sql: str, ts: int) -> LocalCommit:
    done = store.propose_schema(sql, ts)
    store.install(done.commit)
    assert done.commit is not None
    return done.commit


def snapshot(store: Store) -> tuple:
    state = store.schema_state()
    cols = [r[1] for r in store.conn.execute("PRAGMA table_info(kv)")]
    rows = store.conn.execute("SELECT * FROM kv ORDER BY k").fetchall()
    return state.running, state.blocked, cols, rows, store.pending_summary().versions


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=st.permutations(range(7)), ts=st.permutations([10, 20, 30]))
def test_concurrent_proposals_end_the_same_in_any_order(tmp_path_factory, order, ts):
    base_dir = Path(tmp_path_factory.mktemp("chain"))
    stores = [Store(base_dir / f"n{i}.db") for i in range(3)]
    try:
        first = propose(stores[0], BASE, 1)
        for s in stores[1:]:
            apply_now(s, items(stores[0], first))
        # three proposers at once for version 2, each writing to its new column at once; the
        # first also proposes version 3 on top of its own before hearing of the others
        sent: list[tuple[Store, LocalCommit]] = []
        for i, s in enumerate(stores):
            sent.append((s, propose(s, with_columns(f"c{i}"), ts[i])))
            _, write = commit_now(
                s, [(f"INSERT INTO kv (k, v, c{i}) VALUES (?, 'x', 'y')", (f"k{i}",))], 100 + i
            )
            assert write is not None
            sent.append((s, write))
        sent.append((stores[0], propose(stores[0], with_columns("c0", "d"), 40)))
        for j in order:
            origin, commit = sent[j]
            for s in stores:
                if s is not origin:
                    apply_now(s, items(origin, commit))
        views = [snapshot(s) for s in stores]
        assert all(v == views[0] for v in views), views
        running, blocked, cols, rows, pending = views[0]
        assert blocked is None and pending == 0
        winner = chain(read_versions(stores[0].conn))[1]
        assert running.hash == chain(read_versions(stores[0].conn))[-1].hash
        assert [r[0] for r in rows] == ["k0", "k1", "k2"]  # every row arrived, on every node
        assert cols[:2] == ["k", "v"] and len(cols) in (3, 4)
        assert winner.proposed_at == 10  # the earliest proposal won version 2
    finally:
        for s in stores:
            s.close()


def test_a_node_on_a_destructive_loser_stops_instead_of_guessing(tmp_path):
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    try:
        base = propose(a, with_columns("old"), 1)
        apply_now(b, items(a, base))
        winner = propose(a, with_columns("old", "new"), 2)
        done = b.propose_schema(BASE, 3, allow_destructive=True)  # drops `old`: destructive
        b.install(done.commit)
        assert done.proposal.version.destructive
        result = apply_now(b, items(a, winner))
        assert result.schema is not None
        assert "losing proposal" in (result.schema.blocked or "")
        assert "it was destructive" in (result.schema.blocked or "")
        assert b.schema_state().blocked == result.schema.blocked  # kept across restarts
    finally:
        a.close()
        b.close()
