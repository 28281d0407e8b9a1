"""Tombstone GC on real agents (db.tombstone_gc): deleted rows' metadata goes on every node once
all have the deletes, a re-inserted key converges, and the reaper's counters and log say so."""

from __future__ import annotations

import logging

import apsw
import pytest
from agent_helpers import agent_config, cluster, rows
from support import wait_for

from corrosion.config import ConfigError
from corrosion.surfaces.metrics import collect

pytestmark = pytest.mark.anyio

GC = {"tombstone_gc": True, "tombstone_gc_interval": 0.2, "tombstone_gc_batch": 2}


def metadata(agent) -> tuple[int, int, list[tuple]]:
    """(tombstones, lookaside rows, (k, cl) of live keys) read from the file, as a reader would.
    Through apsw, the SQLite the agents use: a second copy of SQLite in one process (the stdlib
    module's) does not see the other's file locks, and its close can pull the WAL index out
    from under the agents (this test once died of SIGBUS that way)."""
    db = apsw.Connection(str(agent.config.db.path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        dead = db.execute(
            "SELECT count(*) FROM kv__crsql_clock WHERE col_name = '-1' AND col_version % 2 = 0"
        ).fetchone()[0]
        keys = db.execute("SELECT count(*) FROM kv__crsql_pks").fetchone()[0]
        cls = db.execute(
            "SELECT k.k, c.col_version FROM kv__crsql_pks AS k JOIN kv__crsql_clock AS c "
            "ON c.key = k.__crsql_key AND c.col_name = '-1' ORDER BY k.k"
        ).fetchall()
        return dead, keys, cls
    finally:
        db.close()


async def test_deleted_rows_are_collected_everywhere_and_a_reused_key_converges(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="corrosion.tombstones")
    async with cluster(tmp_path, 3, with_api=False, db=GC) as agents:
        a, b, c = agents
        for i in range(6):
            await a.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", i]]])
        await b.execute([["DELETE FROM kv WHERE k IN ('k0', 'k1', 'k2', 'k3')"]])
        await c.execute([["DELETE FROM kv WHERE k = 'k4'"]])

        async def collected() -> bool:
            return all(metadata(x)[:2] == (0, 1) for x in agents)

        await wait_for(collected, what="every node to collect the five deleted rows")
        for x in agents:
            assert await rows(x, "SELECT k, v FROM kv") == [("k5", 5)]
            assert x.reaper is not None and x.reaper.stats.reaped == {"kv": 5}
            fams = {name: samples for name, _t, _h, samples in collect(x)}
            assert fams["corro_db_tombstones_reaped_total"] == [({"table": "kv"}, 5.0)]
        assert "tombstone GC collected" in caplog.text

        await b.execute([["INSERT INTO kv (k, v) VALUES ('k1', 'again')"]])

        async def reinserted() -> bool:
            tables = [await rows(x, "SELECT k, v FROM kv ORDER BY k") for x in agents]
            return all(t == [("k1", "again"), ("k5", 5)] for t in tables)

        await wait_for(reinserted, what="the re-inserted key on every node")
        # the fresh insert starts above the floor (2) on every node, as one life of the row
        assert all(metadata(x)[2] == [("k1", 3)] for x in agents)


async def test_off_by_default_keeps_every_tombstone(tmp_path):
    async with cluster(tmp_path, 2, with_api=False) as (a, b):
        await a.execute([["INSERT INTO kv (k, v) VALUES ('x', 1)"]])
        await a.execute([["DELETE FROM kv"]])
        await wait_for(lambda: metadata(b)[:2] == (1, 1), what="the delete on b")
        assert a.reaper is None and b.reaper is None
        assert metadata(a)[:2] == (1, 1)


@pytest.mark.parametrize(
    ("key", "value"),
    [("tombstone_gc", "yes"), ("tombstone_gc_interval", 0), ("tombstone_gc_batch", 0)],
)
def test_a_bad_value_names_its_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"db.{key}"):
        agent_config(tmp_path, "n0", db={key: value})
