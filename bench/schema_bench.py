"""No backfill storms: what adding columns to a replicated table with many rows sends.

Two real stores (SQLite files, corrosion's ``Store``) hold the same ``N`` rows of a replicated
table. Node A proposes a cluster schema version that adds a nullable column and a column with a
constant default (``corrosion schema apply``'s path); the version is shipped to node B, which
applies it (the apply path every node runs). Measured, per ``N`` (100k; and 1M without
``--quick``):

* ``schema_add_column_changes``: changes to the table's rows that the schema change produced on
  any node, i.e. in A's broadcast version plus every local change it left on A or B for sync to
  serve (target 0);
* ``schema_add_column_bytes``: the bytes A broadcasts for the change (the schema version row,
  encoded as the wire's chunks), and ``schema_add_column_version_changes``: its changes (one per
  column of the version row, independent of ``N``);
* the baseline in the same run: ``UPDATE t SET note = ...`` over every row on A, its changes
  and bytes (``update_every_row_changes``, ``update_every_row_bytes``);
* for reference, cr-sqlite's own alter path (``crsql_begin_alter`` / ``ALTER TABLE`` /
  ``crsql_commit_alter``) on B for one more column: the clocks it backfilled
  (``crsql_alter_backfill_changes``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, parse_args

import crdt
from corrosion.core.changeset import chunk_version, encode
from corrosion.core.cluster_schema import TABLE
from corrosion.core.store import LocalCommit, Store

BASE = "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, name TEXT, n INTEGER DEFAULT 0);"
WIDER = (
    "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, name TEXT, n INTEGER DEFAULT 0, "
    "note TEXT, score INTEGER NOT NULL DEFAULT 7);"
)


def frames(store: Store, commit: LocalCommit) -> list[bytes]:
    return [
        encode(c)
        for c in chunk_version(
            store.actor_id,
            commit.version,
            commit.changes,
            commit.last_seq,
            commit.ts,
            commit.db_version,
        )
    ]


def fill(store: Store, n: int) -> None:
    """``n`` rows written straight through the store's connection (tracked by the CRR triggers,
    as a client's writes are), in batches."""
    conn = store.conn
    batch = 50_000
    for start in range(0, n, batch):
        with conn:
            conn.executemany(
                "INSERT INTO t (id, name, n) VALUES (?, ?, ?)",
                ((i, f"row-{i}", i) for i in range(start, min(n, start + batch))),
            )


def local_row_changes(store: Store, since: int) -> int:
    """Changes to user rows this node made since ``since`` (what sync would serve as its own)."""
    return sum(
        1
        for c in crdt.changes_since(store.conn, since)
        if c.table != TABLE and c.site_id in (None, store.actor_id)
    )


def run(n: int, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="schema-bench-") as tmp:
        a, b = Store(Path(tmp) / "a.db"), Store(Path(tmp) / "b.db")
        try:
            base = a.propose_schema(BASE, 1)
            a.install(base.commit)
            assert base.commit is not None
            done = b.apply(list(chunk_version(a.actor_id, 1, base.commit.changes, 0, 1, 1)))
            b.install(done)
            report.info(f"-- {n:,} rows")
            t0 = time.perf_counter()
            fill(a, n)
            fill(b, n)
            report.info(f"   filled both nodes in {time.perf_counter() - t0:.1f}s")
            a_before, b_before = crdt.db_version(a.conn), crdt.db_version(b.conn)

            t0 = time.perf_counter()
            proposal = a.propose_schema(WIDER, 2)
            a.install(proposal.commit)
            propose_s = time.perf_counter() - t0
            commit = proposal.commit
            assert commit is not None
            sent = frames(a, commit)
            t0 = time.perf_counter()
            applied = b.apply(list(chunk_version(a.actor_id, commit.version, commit.changes,
                                                 commit.last_seq, commit.ts, 0)))  # fmt: skip
            b.install(applied)
            apply_s = time.perf_counter() - t0
            assert applied.schema is not None and applied.schema.applied, "B did not apply"
            row_changes = (
                sum(1 for c in commit.changes if c.table != TABLE)
                + local_row_changes(a, a_before)
                + local_row_changes(b, b_before)
            )
            report.metric("schema_add_column_changes", row_changes, "changes",
                          "0 (target)", rows=n)  # fmt: skip
            report.metric("schema_add_column_version_changes", len(commit.changes), "changes",
                          "the version row's columns", rows=n)  # fmt: skip
            report.metric("schema_add_column_bytes", sum(map(len, sent)), "bytes",
                          "update_every_row_bytes", rows=n)  # fmt: skip
            report.metric("schema_add_column_propose_s", propose_s, "s", "none", rows=n)
            report.metric("schema_add_column_apply_s", apply_s, "s", "none", rows=n)

            t0 = time.perf_counter()
            _res, update = a.execute_local([("UPDATE t SET note = 'x'", ())], 3)
            assert update is not None
            a.install(update)
            sent_update = frames(a, update)
            update_s = time.perf_counter() - t0
            report.metric("update_every_row_changes", len(update.changes), "changes",
                          "baseline", rows=n)  # fmt: skip
            report.metric("update_every_row_bytes", sum(map(len, sent_update)), "bytes",
                          "baseline", rows=n)  # fmt: skip
            report.metric("update_every_row_s", update_s, "s", "baseline", rows=n)

            b_before = crdt.db_version(b.conn)
            with b.conn:
                b.conn.execute("SELECT crsql_begin_alter('t')")
                b.conn.execute("ALTER TABLE t ADD COLUMN extra TEXT DEFAULT 'd'")
                b.conn.execute("SELECT crsql_commit_alter('t')")
            report.metric("crsql_alter_backfill_changes", local_row_changes(b, b_before),
                          "changes", "cr-sqlite's alter path", rows=n)  # fmt: skip
        finally:
            a.close()
            b.close()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    report = Report(args.json)
    for n in [100_000] if args.quick else [100_000, 1_000_000]:
        run(n, report)


if __name__ == "__main__":
    main()
