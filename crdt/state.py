"""Per-connection CRR state: db_version, seq, rows impacted, the sync bit, config.

cr-sqlite keeps this in the extension's per-connection data, and so do we. The rules:

* ``db_version`` is the last *committed* version, ``-1`` when unknown. It is never stored on its
  own: it is derived as ``max(db_version)`` over every clock table and the ``pre_compact_dbversion``
  kept by ``crsql_commit_alter``, and reloaded lazily when it is unknown or when
  ``PRAGMA data_version`` shows that another connection committed.
* ``next_db_version(merging)`` returns ``max(db_version + 1, pending, merging)`` and remembers it as
  ``pending``. Every local write of a transaction therefore shares one version; merges raise it to
  the incoming version (a Lamport clock), as a running maximum.
* On commit, ``db_version = pending`` (``-1`` if nothing called it: reload lazily),
  ``pending = -1``, ``seq = 0``, ``rows_impacted = 0``. On rollback, ``pending = -1`` and
  ``seq = 0``.
* ``seq`` numbers clock writes within a transaction: each local clock write takes the current value
  and increments it.
"""

from __future__ import annotations

import apsw

from .sqlutil import ident
from .tableinfo import CLOCK_SUFFIX, crr_tables


class CrrState:
    __slots__ = (
        "_data_version",
        "_version_schema",
        "_version_sql",
        "commits",
        "conn",
        "db_version",
        "merge_equal_values",
        "pending",
        "rows_impacted",
        "seq",
        "site_id",
        "sync_bit",
    )

    def __init__(self, conn: apsw.Connection, site_id: bytes) -> None:
        self.conn = conn
        self.site_id = site_id
        self.db_version = -1
        self.pending = -1
        self.seq = 0
        self.rows_impacted = 0
        self.sync_bit = 0
        self.merge_equal_values = False
        self.commits = 0  # commit hooks run, so callers can tell whether their commit ran one
        self._data_version = -1
        self._version_sql: str | None = None
        self._version_schema = -1

    # -- db_version ------------------------------------------------------------------------

    def fill_db_version_if_needed(self) -> None:
        # PRAGMA data_version changes only on other connections' commits (the file-control
        # variant also counts our own, which would force a reload after every commit).
        row = self.conn.execute("PRAGMA data_version").fetchone()
        assert row is not None  # a PRAGMA always returns its row
        dv = row[0]
        if self.db_version != -1 and dv == self._data_version:
            return
        self._data_version = dv
        self.db_version = self._load_db_version()

    def _load_db_version(self) -> int:
        row = self.conn.execute("PRAGMA schema_version").fetchone()
        assert row is not None
        schema = row[0]
        if self._version_sql is None or schema != self._version_schema:
            parts = [
                f"SELECT max(db_version) AS v FROM {ident(t + CLOCK_SUFFIX)}"
                for t in crr_tables(self.conn)
            ]
            parts.append(
                "SELECT CAST(value AS INTEGER) AS v FROM crsql_master "
                "WHERE key = 'pre_compact_dbversion'"
            )
            self._version_sql = "SELECT max(v) FROM (" + " UNION ALL ".join(parts) + ")"
            self._version_schema = schema
        row = self.conn.execute(self._version_sql).fetchone()
        return row[0] if row and row[0] is not None else 0

    def next_db_version(self, merging: int | None = None) -> int:
        if self.pending == -1:
            self.fill_db_version_if_needed()
        ret = self.db_version + 1
        if ret < self.pending:
            ret = self.pending
        if merging is not None and ret < merging:
            ret = merging
        self.pending = ret
        return ret

    def local_write_guard(self) -> int:
        """The WHEN clause of every CRR trigger: 1 for a local write (sync bit clear), having
        stamped the transaction's pending db_version as upstream's trigger functions do first."""
        if self.sync_bit:
            return 0
        if self.pending == -1:
            self.next_db_version()
        return 1

    def current_db_version(self) -> int:
        self.fill_db_version_if_needed()
        return self.db_version

    def invalidate_db_version(self) -> None:
        """Forget the cached version (after schema surgery such as commit_alter)."""
        self.db_version = -1
        self._version_sql = None

    # -- seq -------------------------------------------------------------------------------

    def bump_seq(self) -> int:
        s = self.seq
        self.seq = s + 1
        return s

    def take_seqs(self, n: int) -> int:
        """Reserve ``n`` consecutive seqs (a row's column clocks); return the first."""
        s = self.seq
        self.seq = s + n
        return s

    # -- transaction hooks ---------------------------------------------------------------

    def on_commit(self) -> bool:
        self.commits += 1
        self.db_version = self.pending
        self.pending = -1
        self.seq = 0
        self.rows_impacted = 0
        return False  # allow the commit

    def on_rollback(self) -> None:
        self.pending = -1
        self.seq = 0

    # -- snapshots, so a failed merge can restore the in-memory state it changed -----------

    def snapshot(self) -> tuple[int, int, int, int]:
        return (self.db_version, self.pending, self.seq, self.rows_impacted)

    def restore(self, snap: tuple[int, int, int, int]) -> None:
        self.db_version, self.pending, self.seq, self.rows_impacted = snap
