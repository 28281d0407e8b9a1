"""CRR engine benchmarks, each beside a baseline measured in the same run.

* ``crr_insert_ratio``: 100k inserts into a CRR ÷ the same inserts into a plain table (apsw,
  one transaction, executemany). cr-sqlite itself: 17.9x.
* ``crr_update_ratio``: ``UPDATE t SET c = c + 1`` over every row, CRR ÷ plain. cr-sqlite: 10.9x.
* ``crr_insert_floor_ratio``, ``crr_update_floor_ratio``: the same, with our triggers replaced by
  plain ones making only the B-tree writes of cr-sqlite's layout (constant versions and seqs, no
  guard): the floor any trigger design on this layout has (see ``FLOOR_TRIGGERS``).
* ``merge_changes_per_s``: 100k column changes (10k rows x 10 columns) merged into a fresh replica;
  ``merge_into_existing_changes_per_s``: into a replica holding older versions of the same rows.
* ``changes_since_rows_per_s``: reading every change with ``crdt.changes_since``.

Quick loops while working on one part (no cr-sqlite run): ``--local-writes`` measures only the
four ``crr_*`` metrics; ``--merge-only`` only the two merge metrics and the read;
``--only changes_since_rows_per_s`` the read alone (a few seconds).

When node and the npm oracle are installed, the real cr-sqlite (WASM) is measured the same way in
the same run (bench/crsqlite_ref.mjs) and its figures are printed beside ours. Both sides measure
CPU time of the process, not wall time (see ``timed``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import apsw
from _common import Report, parse_args

import crdt

ROOT = Path(__file__).resolve().parents[1]
REF_SCRIPT = Path(__file__).resolve().parent / "crsqlite_ref.mjs"
WIDE_COLS = [f"c{i}" for i in range(10)]


def timed(fn) -> float:
    """CPU seconds of ``fn``: everything measured here is single-threaded, CPU-bound work on
    in-memory databases, and CPU time does not count the time other processes on this shared
    machine take from us (wall time here swings by 2x between runs)."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def best_of(n: int, fn) -> float:
    return min(fn() for _ in range(n))


# The floor of cr-sqlite's storage layout: the B-tree writes a CRR's local write must make (the
# lookaside row and one clock row per non-pk column on insert, the column's clock row on update,
# each with its index entries) done by plain triggers with constant versions and seqs, no guard,
# no lookups beyond the key's, no function calls. What our triggers cost above it is theirs.
FLOOR_TRIGGERS = (
    'DROP TRIGGER "t__crsql_itrig"',
    'DROP TRIGGER "t__crsql_utrig_c"',
    """CREATE TRIGGER floor_insert AFTER INSERT ON t BEGIN
  INSERT INTO t__crsql_pks (a) VALUES (NEW.a);
  INSERT INTO t__crsql_clock (key, col_name, col_version, db_version, seq, site_id) VALUES
    (last_insert_rowid(), 'b', 1, 1, NEW.a * 3, 0),
    (last_insert_rowid(), 'c', 1, 1, NEW.a * 3 + 1, 0),
    (last_insert_rowid(), 'd', 1, 1, NEW.a * 3 + 2, 0);
END""",
    """CREATE TRIGGER floor_update AFTER UPDATE OF c ON t BEGIN
  UPDATE t__crsql_clock SET col_version = col_version + 1, db_version = 2, seq = NEW.a
  WHERE key = (SELECT __crsql_key FROM t__crsql_pks WHERE a = +NEW.a) AND col_name = 'c';
END""",
)


def insert_update(n: int, repeats: int) -> dict[str, float]:
    rows = [(i, f"text-{i}", i * 7, i * 0.5) for i in range(n)]
    ddl = "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b TEXT, c INTEGER, d REAL)"

    def run(crr: bool, floor: bool = False) -> tuple[float, float]:
        conn = crdt.connect() if crr else apsw.Connection(":memory:")
        conn.execute(ddl)
        if crr:
            conn.execute("SELECT crsql_as_crr('t')")
        if floor:
            for sql in FLOOR_TRIGGERS:
                conn.execute(sql)

        def ins():
            with conn:
                conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)

        def upd():
            with conn:
                conn.execute("UPDATE t SET c = c + 1")

        ti, tu = timed(ins), timed(upd)
        conn.close()
        return ti, tu

    plain, crr, floor = [], [], []
    for _ in range(repeats):  # interleaved, so that a busy spell hits every kind alike
        plain.append(run(False))
        crr.append(run(True))
        floor.append(run(True, floor=True))
    pi, pu = min(p[0] for p in plain), min(p[1] for p in plain)
    ci, cu = min(c[0] for c in crr), min(c[1] for c in crr)
    fi, fu = min(f[0] for f in floor), min(f[1] for f in floor)
    return {
        "insert_ratio": ci / pi,
        "update_ratio": cu / pu,
        "insert_floor_ratio": fi / pi,
        "update_floor_ratio": fu / pu,
        "insert_us": ci / n * 1e6,
        "update_us": cu / n * 1e6,
        "plain_insert_us": pi / n * 1e6,
        "plain_update_us": pu / n * 1e6,
    }


def wide_source(rows: int, versions: int = 1):
    conn = crdt.connect()
    conn.execute(
        "CREATE TABLE w (id INTEGER PRIMARY KEY NOT NULL, "
        + ", ".join(f"{c} INTEGER" for c in WIDE_COLS)
        + ")"
    )
    conn.execute("SELECT crsql_as_crr('w')")
    with conn:
        conn.executemany(
            f"INSERT INTO w VALUES ({', '.join('?' * 11)})",
            [(i, *range(i, i + 10)) for i in range(rows)],
        )
    for v in range(1, versions):
        with conn:
            conn.execute("UPDATE w SET " + ", ".join(f"{c} = {c} + {v}" for c in WIDE_COLS))
    return conn


def fresh_replica():
    conn = crdt.connect()
    conn.execute(
        "CREATE TABLE w (id INTEGER PRIMARY KEY NOT NULL, "
        + ", ".join(f"{c} INTEGER" for c in WIDE_COLS)
        + ")"
    )
    conn.execute("SELECT crsql_as_crr('w')")
    return conn


def merges(rows: int, repeats: int) -> dict[str, float]:
    newer = wide_source(rows, versions=2)
    older = wide_source(rows, versions=1)
    new_changes = crdt.changes_since(newer, 0)
    old_changes = crdt.changes_since(older, 0)
    n = len(new_changes)

    def into_fresh():
        dst = fresh_replica()
        t = timed(lambda: crdt.merge(dst, new_changes))
        dst.close()
        return t

    def into_existing():
        dst = fresh_replica()
        crdt.merge(dst, old_changes)
        t = timed(lambda: crdt.merge(dst, new_changes))
        dst.close()
        return t

    def read():
        return timed(lambda: crdt.changes_since(newer, 0))

    return {
        "merge_fresh": n / best_of(repeats, into_fresh),
        "merge_existing": n / best_of(repeats, into_existing),
        "changes_since": n / best_of(repeats, read),
        "changes": n,
    }


def reference(n: int, rows: int) -> dict | None:
    module = ROOT / "tests" / "oracle" / "node_modules" / "@vlcn.io" / "wa-sqlite"
    if shutil.which("node") is None or not module.exists():
        return None
    out = subprocess.run(
        ["node", str(REF_SCRIPT), str(n), str(rows)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _options(p) -> None:
    p.add_argument(
        "--local-writes",
        action="store_true",
        help="only the crr_* insert/update metrics and their floors (no merges, no cr-sqlite)",
    )
    p.add_argument(
        "--only", choices=("changes_since_rows_per_s",), help="measure this metric alone"
    )
    p.add_argument(
        "--merge-only", action="store_true", help="merge and read metrics only, no cr-sqlite"
    )


def reads(rows: int, repeats: int) -> dict[str, float]:
    source = wide_source(rows, versions=2)
    n = len(crdt.changes_since(source, 0))
    return {
        "changes_since": n / best_of(repeats, lambda: timed(lambda: crdt.changes_since(source, 0))),
        "changes": n,
    }


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], _options)
    report = Report(args.json)
    n = 20_000 if args.quick else 100_000
    rows = n // 10
    repeats = 2 if args.quick else 3
    if args.only:
        m = reads(rows, repeats)
        report.metric(
            "changes_since_rows_per_s",
            m["changes_since"],
            "rows/s",
            "none: alone",
            rows=m["changes"],
        )
        return
    ref = None if args.local_writes or args.merge_only else reference(n, rows)
    ref_note = (lambda k: {"crsqlite": round(ref[k], 2)}) if ref else (lambda k: {})
    if not args.merge_only:
        _report_local_writes(report, insert_update(n, repeats), n, ref_note)
    if args.local_writes:
        return
    no_ref = "none: --merge-only" if args.merge_only else "none: node missing"
    _report_merges(report, merges(rows, repeats), ref, ref_note, no_ref)


def _report_local_writes(report: Report, iu: dict[str, float], n: int, ref_note) -> None:
    report.metric(
        "crr_insert_ratio",
        iu["insert_ratio"],
        "x",
        "plain sqlite insert (apsw)",
        rows=n,
        us_per_row=round(iu["insert_us"], 2),
        **ref_note("insert_ratio"),
    )
    report.metric(
        "crr_update_ratio",
        iu["update_ratio"],
        "x",
        "plain sqlite update (apsw)",
        rows=n,
        us_per_row=round(iu["update_us"], 2),
        **ref_note("update_ratio"),
    )
    report.metric(
        "crr_insert_floor_ratio",
        iu["insert_floor_ratio"],
        "x",
        "plain sqlite insert; the layout's B-tree writes alone (constant triggers)",
        rows=n,
    )
    report.metric(
        "crr_update_floor_ratio",
        iu["update_floor_ratio"],
        "x",
        "plain sqlite update; the layout's B-tree writes alone (constant triggers)",
        rows=n,
    )


def _report_merges(
    report: Report, m: dict[str, float], ref: dict | None, ref_note, no_ref: str
) -> None:
    baseline = "cr-sqlite WASM (same run)" if ref else no_ref
    report.metric(
        "merge_changes_per_s",
        m["merge_fresh"],
        "changes/s",
        baseline,
        changes=m["changes"],
        **ref_note("merge_fresh"),
    )
    report.metric(
        "merge_into_existing_changes_per_s",
        m["merge_existing"],
        "changes/s",
        baseline,
        changes=m["changes"],
        **ref_note("merge_existing"),
    )
    report.metric(
        "changes_since_rows_per_s",
        m["changes_since"],
        "rows/s",
        baseline,
        rows=m["changes"],
        **ref_note("changes_since"),
    )
    if ref:
        report.metric(
            "merge_vs_crsqlite",
            m["merge_fresh"] / ref["merge_fresh"],
            "x",
            "cr-sqlite WASM merge into a fresh replica",
        )
        report.metric(
            "changes_since_vs_crsqlite",
            m["changes_since"] / ref["changes_since"],
            "x",
            "cr-sqlite WASM crsql_changes read",
        )


if __name__ == "__main__":
    main()
