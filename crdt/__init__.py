"""CRR engine: SQLite tables become conflict-free replicated relations with cr-sqlite 0.16.3's
semantics and wire format, without its native extension.

    conn = crdt.connect("app.db")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, name TEXT)")
    conn.execute("SELECT crsql_as_crr('t')")
    conn.execute("INSERT INTO t VALUES (1, 'a')")
    changes = crdt.changes_since(conn, 0)          # what a peer pulls
    crdt.merge(other_conn, changes)                # what the peer applies

The SQL surface (``crsql_*`` functions, ``crsql_changes``) matches cr-sqlite, so code written for it
works unchanged; docs/crdt-compatibility.md lists every deliberate deviation.
"""

from .changes import Change, ChangeRow, CompactChanges, changes_for_version, changes_since
from .connection import (
    Connection,
    as_crr,
    connect,
    db_version,
    merge,
    merge_changesets,
    new_site_id,
    site_id,
)
from .errors import (
    CrdtError,
    DestructiveChangeRefused,
    IncompatibleTableError,
    MergeError,
    PackError,
    SchemaError,
)
from .fractindex import FractIndexError, as_ordered, key_between
from .pack import pack_pk, unpack_pk
from .values import compare_values

__all__ = [
    "Change",
    "ChangeRow",
    "CompactChanges",
    "Connection",
    "CrdtError",
    "DestructiveChangeRefused",
    "FractIndexError",
    "IncompatibleTableError",
    "MergeError",
    "PackError",
    "SchemaError",
    "as_crr",
    "as_ordered",
    "changes_for_version",
    "changes_since",
    "compare_values",
    "connect",
    "db_version",
    "key_between",
    "merge",
    "merge_changesets",
    "new_site_id",
    "pack_pk",
    "site_id",
    "unpack_pk",
]
