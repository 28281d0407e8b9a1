"""``corrosion backup`` / ``corrosion restore``: a generic snapshot restored on a fresh node gives
a node with the same data and a new actor id that then syncs with the cluster; ``--self-actor-id``
keeps the identity; restore refuses while the agent runs and replaces the file safely."""

from __future__ import annotations

import contextlib

import apsw
import pytest
from cli_helpers import cli, cluster, gossip_of, node_mapping, rows, short_tmp
from support import wait_for

from corrosion import Agent, Config
from corrosion.ops.backup import BackupError, backup, restore

pytestmark = pytest.mark.anyio


def read_db(path, sql, params=()):
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def local_site(path) -> bytes | None:
    got = read_db(path, "SELECT site_id FROM crsql_site_id WHERE ordinal = 0")
    return got[0][0] if got else None


async def titles(agent) -> list[tuple]:
    return await rows(agent, "SELECT id, title FROM todos ORDER BY id")


async def test_restored_node_has_the_data_a_new_identity_and_syncs():
    with short_tmp() as base:
        async with cluster(base, 2) as (a, b):
            await a.execute([f"INSERT INTO todos (id, title) VALUES ({i}, 'a{i}')" for i in (1, 2)])
            await b.execute(["INSERT INTO todos (id, title) VALUES (3, 'b3')"])
            await wait_for(
                lambda: a.sync_state()["heads"].get(b.actor_id.hex()) == 1, what="b's write on a"
            )
            snapshot = await titles(a)
            assert len(snapshot) == 3

            # backup of a running node
            out = base / "backups" / "a.db"
            out.parent.mkdir()
            result = await cli(
                "backup", str(out), "-c", "/nonexistent", "--db-path", str(a.config.db.path)
            )
            assert result.exit_code == 0, result.output
            assert a.actor_id.hex() in result.stdout
            # the copy is generic: no local actor, a's rows stamped with a regular ordinal
            assert local_site(out) is None
            sites = dict(read_db(out, "SELECT site_id, ordinal FROM crsql_site_id"))
            assert sites[a.actor_id] > 0
            assert read_db(out, "SELECT count(*) FROM todos__crsql_clock WHERE site_id = 0") == [
                (0,)
            ]
            assert read_db(out, "SELECT count(*) FROM __corro_members") == [(0,)]
            assert read_db(out, "PRAGMA journal_mode") == [("delete",)]

            # restoring over a running agent's database is refused, the database untouched
            result = await cli(
                "restore", str(out), "--db-path", str(a.config.db.path),
                "--admin-path", str(a.config.admin_path),
            )  # fmt: skip
            assert result.exit_code == 1
            assert "agent is running" in result.stderr
            assert await titles(a) == snapshot

            # writes after the backup reach the restored node through sync
            await b.execute(["INSERT INTO todos (id, title) VALUES (4, 'after backup')"])

            c_data = node_mapping(base, "c", [gossip_of(a)])
            c_db = base / "c" / "state.db"
            result = await cli(
                "restore", str(out), "--db-path", str(c_db), "--admin-path", c_data["admin"]["path"]
            )
            assert result.exit_code == 0, result.output
            assert "new actor id" in result.stdout
            assert read_db(c_db, "SELECT id, title FROM todos ORDER BY id") == snapshot

            async with Agent(Config.from_mapping(c_data)) as c:
                assert c.actor_id not in (a.actor_id, b.actor_id)
                # the snapshot's versions are held already: nothing of a's or b's is missing
                assert c.sync_state()["heads"][a.actor_id.hex()] == 1
                await wait_for(lambda: c.alive_members() == 2, what="c to join")
                await wait_for(lambda: _has(c, 4), what="post-backup row on c")
                await c.execute(["INSERT INTO todos (id, title) VALUES (5, 'from c')"])
                for other in (a, b):
                    await wait_for(lambda o=other: _has(o, 5), what="c's write everywhere")
                expected = await titles(a)
                assert len(expected) == 5
                for node in (b, c):
                    assert await titles(node) == expected
                for node in (a, b, c):
                    assert node.gaps() == 0
                heads = a.sync_state()["heads"]
                assert heads[c.actor_id.hex()] == 1


async def _has(agent, todo_id: int) -> bool:
    return bool(await rows(agent, "SELECT 1 FROM todos WHERE id = ?", (todo_id,)))


async def test_self_actor_id_keeps_the_identity():
    with short_tmp() as base:
        async with cluster(base, 1) as (a,):
            data = node_mapping(base, "b", [gossip_of(a)])
            async with Agent(Config.from_mapping(data)) as b:
                b_actor = b.actor_id
                await b.execute(["INSERT INTO todos (id, title) VALUES (1, 'b1')"])
                await wait_for(lambda: _has(a, 1), what="b's write on a")
            # b is stopped: back it up and restore it in place, keeping its identity
            db = base / "b" / "state.db"
            out = base / "b.backup"
            assert (await cli("backup", str(out), "--db-path", str(db))).exit_code == 0
            result = await cli(
                "restore", str(out), "--self-actor-id", "--db-path", str(db),
                "--admin-path", data["admin"]["path"],
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            assert b_actor.hex() in result.stdout
            assert local_site(db) == b_actor
            assert read_db(db, "SELECT count(*) FROM todos__crsql_clock WHERE site_id != 0") == [
                (0,)
            ]
            async with Agent(Config.from_mapping(data)) as b:
                assert b.actor_id == b_actor
                assert await titles(b) == [(1, "b1")]
                # its next version continues the sequence, so peers accept it
                answer = await b.execute(["INSERT INTO todos (id, title) VALUES (2, 'b2')"])
                assert answer.version == 2
                await wait_for(lambda: _has(a, 2), what="b's new write on a")
                assert a.gaps() == 0
            # the backup is now older than b: keeping b's identity with it is refused
            result = await cli(
                "restore", str(out), "--self-actor-id", "--db-path", str(db),
                "--admin-path", data["admin"]["path"],
            )  # fmt: skip
            assert result.exit_code == 1
            assert "older state" in result.stderr
            assert read_db(db, "SELECT id FROM todos ORDER BY id") == [(1,), (2,)]

            # --actor-id sets an explicit identity (e.g. moving a node to a new disk)
            fresh = base / "moved" / "state.db"
            result = await cli(
                "restore", str(out), "--actor-id", b_actor.hex(), "--db-path", str(fresh),
                "--admin-path", str(base / "moved.sock"),
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            assert local_site(fresh) == b_actor


async def test_restore_replaces_the_file_under_sqlite_locks():
    with short_tmp() as base:
        async with cluster(base, 1) as (a,):
            await a.execute(["INSERT INTO todos (id, title) VALUES (1, 'one')"])
            out = base / "a.backup"
            backup(a.config.db.path, out)
            with pytest.raises(BackupError, match="already exists"):
                backup(a.config.db.path, out)
            # a mistyped directory is said, not made (the backup would go unnoticed there)
            typo = base / "nonexistent" / "dir" / "x.db"
            result = await cli("backup", str(typo), "--db-path", str(a.config.db.path))
            assert result.exit_code == 1
            assert result.stderr == (
                f"error: backup destination's directory {typo.parent} does not exist\n"
            )
            assert not (base / "nonexistent").exists()
            result = await cli("backup", str(out / "x.db"), "--db-path", str(a.config.db.path))
            assert (
                result.stderr == f"error: backup destination's directory {out} is not a directory\n"
            )
        target = base / "t" / "state.db"
        # stale -wal/-shm of a database that is gone must not be replayed into the new one
        target.parent.mkdir()
        (base / "t" / "state.db-wal").write_bytes(b"\x00" * 5000)
        (base / "t" / "state.db-shm").write_bytes(b"\x00" * 5000)
        restore(out, target)
        assert read_db(target, "SELECT title FROM todos") == [("one",)]

        # a reader holding the file open sees the old data, then the new data; never a mix
        other = base / "other.backup"
        data = node_mapping(base, "o")
        async with Agent(Config.from_mapping(data)) as o:
            await o.execute([f"INSERT INTO todos (id, title) VALUES ({i}, 'o')" for i in range(9)])
        backup(data["db"]["path"], other)
        reader = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
        with contextlib.closing(reader):
            assert reader.execute("SELECT count(*) FROM todos").fetchall() == [(1,)]
            info = restore(other, target)
            assert info.new_size > 0
            assert reader.execute("SELECT count(*) FROM todos").fetchall() == [(9,)]
            # a reader in the middle of a read transaction keeps its snapshot until it ends
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM todos").fetchall() == [(9,)]
            restore(out, target)
            assert reader.execute("SELECT count(*) FROM todos").fetchall() == [(9,)]
            reader.execute("COMMIT")
            assert reader.execute("SELECT count(*) FROM todos").fetchall() == [(1,)]
        # a writer holding the lock: restore waits, then gives up and changes nothing
        writer = apsw.Connection(str(target))
        with contextlib.closing(writer):
            writer.execute("BEGIN IMMEDIATE")
            with pytest.raises(BackupError, match="locked"):
                restore(other, target, lock_timeout=0.2)
            writer.execute("ROLLBACK")
        assert read_db(target, "SELECT count(*) FROM todos") == [(1,)]

        # a raw copy (not made generic) restores with a new identity too
        raw = base / "raw.db"
        src = apsw.Connection(data["db"]["path"])
        with contextlib.closing(src):
            src.execute("VACUUM INTO ?", (str(raw),))
        restore(raw, base / "r" / "state.db")
        assert local_site(base / "r" / "state.db") is None
