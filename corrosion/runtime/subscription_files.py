"""Each subscription in its own SQLite file, so that it survives the agent's restarts (as
corrosion keeps ``<db.subscriptions_path>/<id>/sub.sqlite``).

A file holds the subscription's query (its SQL, normalised SQL, parameters and hash), its
columns, its current rows with their row ids, and its most recent changes. Every batch of
changes is written in one transaction *before* any client sees it, so a change id a client has
seen is on disk even if the agent is killed right after (WAL with ``synchronous=NORMAL``:
durable across a process crash; a power loss may lose the last batches, which the agent then
computes again when it restores the subscription, though not necessarily with the same ids).
Values keep their SQLite type exactly: rows and changes are stored in untyped columns ``c0``,
``c1``, ...

All functions here do file I/O: call them in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import apsw

from ..errors import CorrosionError

FILE_NAME = "sub.sqlite"  # corrosion's name, in a directory named after the subscription
FORMAT = "corrosion-py subscription 1"  # bumped when the layout changes; others are dropped
_KINDS = ("insert", "update", "delete")


class SubscriptionFileError(CorrosionError, ValueError):
    """A subscription file cannot be used (corrupt, incomplete, or of another format)."""


class Change(Protocol):
    """A change as the file keeps it (``subscriptions.Event`` is one)."""

    change_id: int
    kind: str
    rowid: int
    row: tuple


@dataclass
class StoredChange:
    change_id: int
    kind: str
    rowid: int
    row: tuple


@dataclass
class StoredSubscription:
    """What a subscription file holds, read back at start-up."""

    id: str
    sql: str
    normalized: str
    params: Any
    hash: str
    columns: list[str]
    rows: list[tuple[int, tuple]]
    next_rowid: int
    change_id: int
    changes: list[StoredChange]


def directory_of(root: Path, sid: str) -> Path:
    """Where subscription ``sid`` (a UUID) lives: ``<root>/<uuid as 32 hex digits>``."""
    return root / sid.replace("-", "")


def subscription_dirs(root: Path) -> list[Path]:
    """The subscription directories under ``root``, in a stable order."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir())


def remove_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _cols(n: int) -> str:
    return ",".join(f"c{i}" for i in range(n))


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _connect(path: Path, *, create: bool) -> apsw.Connection:
    flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
    conn = apsw.Connection(str(path), flags=flags)
    conn.set_busy_timeout(5000)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _encode_params(params: Any) -> tuple[str, list[tuple[int, str | None, Any]]]:
    if isinstance(params, dict):
        return "named", [(i, k, v) for i, (k, v) in enumerate(params.items())]
    return "positional", [(i, None, v) for i, v in enumerate(params or ())]


def _decode_params(kind: str, rows: Sequence[Any]) -> Any:
    if kind == "named":
        return {name: value for _pos, name, value in rows}
    if kind == "positional":
        return [value for _pos, _name, value in rows] if rows else ()
    raise SubscriptionFileError(f"unknown parameter kind {kind!r}")


class SubscriptionFile:
    """The open file of one subscription."""

    def __init__(self, directory: Path, conn: apsw.Connection, width: int) -> None:
        self.directory = directory
        self._conn = conn
        self._width = width  # the number of result columns

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        sid: str,
        sql: str,
        normalized: str,
        params: Any,
        hash: str,
        columns: Sequence[str],
        rows: Iterable[tuple[int, tuple]],
        next_rowid: int,
    ) -> SubscriptionFile:
        """Write a new subscription's file in one transaction (a crash leaves no half file
        that could be taken for a subscription: an incomplete one is dropped at start-up)."""
        directory.mkdir(parents=True, exist_ok=True)
        conn = _connect(directory / FILE_NAME, create=True)
        width = len(columns)
        kind, param_rows = _encode_params(params)
        try:
            with conn:
                conn.execute(
                    f"""
                    CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID;
                    CREATE TABLE params (position INTEGER PRIMARY KEY, name TEXT, value);
                    CREATE TABLE rows (row_id INTEGER PRIMARY KEY, {_cols(width)});
                    CREATE TABLE changes (
                        change_id INTEGER PRIMARY KEY,
                        kind TEXT NOT NULL,
                        row_id INTEGER NOT NULL,
                        {_cols(width)}
                    );
                    """
                )
                meta = {
                    "format": FORMAT,
                    "id": sid,
                    "sql": sql,
                    "normalized_sql": normalized,
                    "params_kind": kind,
                    "hash": hash,
                    "columns": json.dumps(list(columns)),
                    "next_rowid": next_rowid,
                    "change_id": 0,
                }
                conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
                conn.executemany("INSERT INTO params VALUES (?, ?, ?)", param_rows)
                conn.executemany(
                    f"INSERT INTO rows VALUES (?, {_marks(width)})",
                    ((rowid, *row) for rowid, row in rows),
                )
        except BaseException:
            conn.close()
            remove_directory(directory)
            raise
        return cls(directory, conn, width)

    @classmethod
    def open(
        cls, directory: Path, keep_changes: int
    ) -> tuple[SubscriptionFile, StoredSubscription]:
        """Read a subscription back; ``SubscriptionFileError`` says why it cannot be used.
        Changes beyond the last ``keep_changes`` are purged (the setting may have shrunk)."""
        path = directory / FILE_NAME
        if not path.is_file():
            raise SubscriptionFileError(f"it has no {FILE_NAME}")
        try:
            conn = _connect(path, create=False)
        except apsw.Error as exc:
            raise SubscriptionFileError(f"cannot open it: {exc}") from None
        try:
            stored = cls._read(conn, directory, keep_changes)
        except SubscriptionFileError:
            conn.close()
            raise
        except (apsw.Error, KeyError, ValueError, TypeError) as exc:
            conn.close()
            raise SubscriptionFileError(f"it is unreadable ({type(exc).__name__}: {exc})") from None
        return cls(directory, conn, len(stored.columns)), stored

    @staticmethod
    def _read(conn: apsw.Connection, directory: Path, keep: int) -> StoredSubscription:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        if "meta" not in tables:
            raise SubscriptionFileError("it is not a subscription file (no meta table)")
        meta: dict[Any, Any] = {k: v for k, v in conn.execute("SELECT key, value FROM meta")}
        if meta.get("format") != FORMAT:
            found = meta.get("format") or "none (corrosion's own, or older)"
            raise SubscriptionFileError(f"its format is {found}, this agent reads {FORMAT}")
        sid = str(meta["id"])
        if directory.name != sid.replace("-", ""):
            raise SubscriptionFileError(f"it holds subscription {sid}, not {directory.name}")
        columns = json.loads(meta["columns"])
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise SubscriptionFileError("its columns are not a list of names")
        width = len(columns)
        change_id = int(meta["change_id"])
        with conn:
            conn.execute("DELETE FROM changes WHERE change_id <= ?", (change_id - keep,))
        select = f"SELECT row_id, {_cols(width)} FROM rows ORDER BY row_id"
        rows = [(r[0], tuple(r[1:])) for r in conn.execute(select)]
        changes = [
            StoredChange(r[0], r[1], r[2], tuple(r[3:]))
            for r in conn.execute(
                f"SELECT change_id, kind, row_id, {_cols(width)} FROM changes ORDER BY change_id"
            )
        ]
        if any(c.kind not in _KINDS for c in changes) or (
            changes and changes[-1].change_id != change_id
        ):
            raise SubscriptionFileError("its changes do not match its change id")
        params = conn.execute(
            "SELECT position, name, value FROM params ORDER BY position"
        ).fetchall()
        return StoredSubscription(
            id=sid,
            sql=str(meta["sql"]),
            normalized=str(meta["normalized_sql"]),
            params=_decode_params(str(meta["params_kind"]), params),
            hash=str(meta["hash"]),
            columns=columns,
            rows=rows,
            next_rowid=int(meta["next_rowid"]),
            change_id=change_id,
            changes=changes,
        )

    def append(self, changes: Sequence[Change], next_rowid: int, keep_changes: int) -> None:
        """Apply a batch of changes to the rows and append them, in one transaction; keep only
        the last ``keep_changes``."""
        if not changes:
            return
        w = self._width
        conn = self._conn
        with conn:
            for c in changes:
                if c.kind == "delete":
                    conn.execute("DELETE FROM rows WHERE row_id = ?", (c.rowid,))
                else:  # insert or update: the row as it is now
                    conn.execute(
                        f"INSERT OR REPLACE INTO rows VALUES (?, {_marks(w)})", (c.rowid, *c.row)
                    )
            conn.executemany(
                f"INSERT INTO changes VALUES (?, ?, ?, {_marks(w)})",
                ((c.change_id, c.kind, c.rowid, *c.row) for c in changes),
            )
            last = changes[-1].change_id
            conn.execute("DELETE FROM changes WHERE change_id <= ?", (last - keep_changes,))
            conn.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                ((last, "change_id"), (next_rowid, "next_rowid")),
            )

    def close(self) -> None:
        with contextlib.suppress(apsw.Error):
            self._conn.close()

    def delete(self) -> None:
        """The subscription is gone: close and remove its directory."""
        self.close()
        remove_directory(self.directory)
