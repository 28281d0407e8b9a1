"""Backup and restore of an agent's database, with corrosion's semantics.

A node's identity is the site id at ordinal 0 of ``crsql_site_id``; its own writes are stamped
``site_id = 0`` in every clock table. A raw copy of the file would therefore make whoever opens it
*the same actor* as the original node — two nodes numbering versions of one actor independently,
which replication cannot tell apart. So:

``backup``   ``VACUUM INTO`` a consistent snapshot (safe while the agent runs), then make the copy
             generic: move the node's site id from ordinal 0 to a regular ordinal, rewrite the
             clock tables' ``site_id = 0`` rows to it (its writes now read as any remote actor's)
             and clear ``__corro_members`` (membership is per node). The copy is a single file in
             rollback-journal mode, easy to ship around.
``restore``  refuses while an agent answers on the admin socket; stages the backup in a temp file
             next to the database, makes it generic as well (so a raw copy is also safe), then —
             with ``keep_actor`` — gives ordinal 0 back to the node's own site id (its rows in the
             snapshot become local again); finally copies the staged file over the database with
             SQLite's online backup API, which takes SQLite's own locks, so processes reading the
             file directly see either the old or the new database, never a torn one. Stale
             ``-wal``/``-shm`` files of a missing database are removed first (SQLite would replay
             them into the new file).

Without ``keep_actor`` the restored node gets a fresh actor id at its first start, holds every
version of the snapshot (bookkeeping travels with the data, keyed by actor) and catches up on the
rest through sync. Keep the actor only when the snapshot is the node's latest state (moving a node
to a new disk): a node restored to an *older* state of itself would re-use version numbers its
peers already hold, and those writes would be ignored as duplicates. ``keep_actor`` therefore
refuses a backup that holds fewer of the node's own versions than its current database.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import apsw

from crdt.crr import upgrade_triggers

from ..errors import CorrosionError
from ..runtime.dblock import database_in_use, lock_path
from ..surfaces.admin_client import agent_listening

CLOCK_SUFFIX = "__crsql_clock"


class BackupError(CorrosionError):
    """Backup or restore refused or failed; the message says why (nothing was changed)."""


@dataclass
class BackupInfo:
    path: Path
    size: int
    actor_id: str | None  # the node the snapshot was taken from
    rows_rewritten: int


@dataclass
class RestoreInfo:
    path: Path
    old_size: int
    new_size: int
    actor_id: str | None  # ordinal 0 after the restore; None: a new one is made at start


def _clock_tables(conn: apsw.Connection) -> list[str]:
    return [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE ? ESCAPE '\\'",
            ("%\\_\\_crsql\\_clock",),
        )
        if name.endswith(CLOCK_SUFFIX)
    ]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _has_table(conn: apsw.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def make_generic(conn: apsw.Connection) -> tuple[bytes | None, int]:
    """Move the local site id (ordinal 0) to a regular ordinal and re-stamp its clock rows;
    clear per-node membership. Returns (the site id moved, clock rows rewritten). Runs in the
    caller's transaction."""
    tables = _clock_tables(conn)
    row = conn.execute("DELETE FROM crsql_site_id WHERE ordinal = 0 RETURNING site_id").fetchone()
    rewritten = 0
    site = row[0] if row else None
    if site is not None:
        (ordinal,) = cast(
            "tuple[int]",
            conn.execute(
                "INSERT INTO crsql_site_id (site_id) VALUES (?) RETURNING ordinal", (site,)
            ).fetchone(),
        )
        for t in tables:
            conn.execute(f"UPDATE {_quote(t)} SET site_id = ? WHERE site_id = 0", (ordinal,))
            rewritten += conn.changes()
    else:
        for t in tables:
            if conn.execute(f"SELECT 1 FROM {_quote(t)} WHERE site_id = 0 LIMIT 1").fetchone():
                raise BackupError(f"the database has no local site id but {t} has local rows")
    if _has_table(conn, "__corro_members"):
        conn.execute("DELETE FROM __corro_members")
    return site, rewritten


def adopt_actor(conn: apsw.Connection, site: bytes) -> int:
    """Make ``site`` the local actor (ordinal 0) of a generic database: its clock rows become
    local again. Returns the clock rows rewritten. Runs in the caller's transaction."""
    row = conn.execute(
        "DELETE FROM crsql_site_id WHERE site_id = ? RETURNING ordinal", (site,)
    ).fetchone()
    rewritten = 0
    if row is not None:
        for t in _clock_tables(conn):
            conn.execute(f"UPDATE {_quote(t)} SET site_id = 0 WHERE site_id = ?", (row[0],))
            rewritten += conn.changes()
    conn.execute("INSERT INTO crsql_site_id (site_id, ordinal) VALUES (?, 0)", (site,))
    return rewritten


def backup(db_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> BackupInfo:
    """Write a generic snapshot of the database at ``db_path`` to ``out`` (must not exist; its
    directory must)."""
    db_path, out = Path(db_path), Path(out)
    if not db_path.exists():
        raise BackupError(f"database {str(db_path)!r} does not exist")
    if out.exists():
        raise BackupError(f"backup path {str(out)!r} already exists")
    # a directory is not made for the copy: a mistyped one would hide the backup where nobody
    # looks for it (as `corrosion profile --out` refuses one)
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise BackupError(f"backup destination's directory {out.parent} {what}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        src = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            src.set_busy_timeout(30_000)
            if not _has_table(src, "crsql_site_id"):
                raise BackupError(f"{str(db_path)!r} is not a corrosion database")
            src.execute("VACUUM INTO ?", (str(tmp),))
        finally:
            src.close()
        conn = apsw.Connection(str(tmp))
        try:
            with conn:
                site, rewritten = make_generic(conn)
                # triggers an earlier release stored (a source this release never opened)
                # are rewritten, so the copy opens in any SQLite >= 3.37
                upgrade_triggers(conn)
            conn.execute("PRAGMA journal_mode = DELETE")
        finally:
            conn.close()
        os.replace(tmp, out)
    except apsw.Error as exc:
        raise BackupError(f"backup failed: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return BackupInfo(out, out.stat().st_size, site.hex() if site else None, rewritten)


def restore(
    backup_path: str | os.PathLike[str],
    db_path: str | os.PathLike[str],
    *,
    admin_path: str | os.PathLike[str] | None = None,
    keep_actor: bool = False,
    actor_id: bytes | None = None,
    lock_timeout: float = 30.0,
) -> RestoreInfo:
    """Replace the database at ``db_path`` with the snapshot at ``backup_path``.

    ``keep_actor`` keeps the node's current actor id (read from ``db_path``); ``actor_id`` sets
    one explicitly. Refuses while an agent listens on ``admin_path``."""
    backup_path, db_path = Path(backup_path), Path(db_path)
    if database_in_use(db_path):
        raise BackupError(
            f"an agent is running on {str(db_path)!r} (it holds {str(lock_path(db_path))!r}); "
            "stop it before restoring"
        )
    if admin_path is not None and agent_listening(admin_path):
        raise BackupError(
            f"an agent is running (its admin socket {str(admin_path)!r} answers); "
            "stop it before restoring"
        )
    if not backup_path.is_file():
        raise BackupError(f"backup {str(backup_path)!r} does not exist")
    if actor_id is not None and len(actor_id) != 16:
        raise BackupError("the actor id must be 16 bytes (32 hex digits)")
    own_head = 0
    if keep_actor and actor_id is None:
        actor_id = _local_site(db_path)
        own_head = _head(db_path, actor_id)
    old_size = db_path.stat().st_size if db_path.exists() else 0
    staged = db_path.with_name(f".{db_path.name}.{os.getpid()}.restore")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    try:
        src = apsw.Connection(str(backup_path), flags=apsw.SQLITE_OPEN_READONLY)
        stage = apsw.Connection(str(staged))
        try:
            check = src.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise BackupError(f"backup {str(backup_path)!r} is corrupt: {check}")
            if not (_has_table(src, "crsql_site_id") and _has_table(src, "__corro_bookkeeping")):
                raise BackupError(f"{str(backup_path)!r} is not a corrosion database")
            if own_head > _head(backup_path, actor_id):
                assert actor_id is not None  # own_head is only set with one
                raise BackupError(
                    f"the backup holds an older state of actor {actor_id.hex()} (this node has "
                    f"versions up to {own_head}); keeping the actor id would re-use version "
                    "numbers its peers already hold; restore without --self-actor-id instead"
                )
            with stage.backup("main", src, "main") as b:
                b.step(-1)
            with stage:
                make_generic(stage)
                if actor_id is not None:
                    adopt_actor(stage, actor_id)
            _copy_into(stage, db_path, lock_timeout)
        finally:
            stage.close()
            src.close()
    except apsw.BusyError:
        raise BackupError(
            f"database {str(db_path)!r} stayed locked for {lock_timeout:g}s; nothing restored"
        ) from None
    except apsw.Error as exc:
        raise BackupError(f"restore failed: {exc}") from None
    finally:
        for p in (staged, Path(f"{staged}-journal")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return RestoreInfo(
        db_path, old_size, db_path.stat().st_size, actor_id.hex() if actor_id else None
    )


def _local_site(db_path: Path) -> bytes:
    if not db_path.exists():
        raise BackupError(f"cannot keep the actor id: {str(db_path)!r} does not exist")
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = conn.execute("SELECT site_id FROM crsql_site_id WHERE ordinal = 0").fetchone()
    except apsw.SQLError:
        row = None
    finally:
        conn.close()
    if row is None:
        raise BackupError(f"cannot keep the actor id: {str(db_path)!r} has none")
    return row[0]


def _head(db_path: Path, actor: bytes | None) -> int:
    """The highest version of ``actor`` booked in the database at ``db_path`` (0: none)."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = conn.execute(
            "SELECT max(end_version) FROM __corro_bookkeeping WHERE actor_id = ?", (actor,)
        ).fetchone()
    except apsw.SQLError:
        row = None
    finally:
        conn.close()
    return (row[0] or 0) if row else 0


def _copy_into(stage: apsw.Connection, db_path: Path, lock_timeout: float) -> None:
    """Copy ``stage`` over ``db_path`` under SQLite's locks (the online backup API)."""
    if not db_path.exists():
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{db_path}{suffix}").unlink()
    dst = apsw.Connection(str(db_path))
    try:
        dst.set_busy_timeout(int(lock_timeout * 1000))
        (dst_page,) = cast("tuple[int]", dst.execute("PRAGMA page_size").fetchone())
        (src_page,) = cast("tuple[int]", stage.execute("PRAGMA page_size").fetchone())
        (mode,) = cast("tuple[str]", dst.execute("PRAGMA journal_mode").fetchone())
        if mode == "wal" and dst_page != src_page:
            # a WAL database cannot change page size; leave WAL for the copy
            dst.execute("PRAGMA journal_mode = DELETE")
        with dst.backup("main", stage, "main") as b:
            b.step(-1)
        dst.execute("PRAGMA journal_mode = WAL")
        # PASSIVE: never wait for readers still on the old snapshot (TRUNCATE would)
        dst.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        dst.close()
