"""What an apply returns about the changes it merged: ``ApplyResult.changes`` (a ``ChangeList``)
reads as the nine-field changes of the applied versions, in order, whether the versions came
decoded from frames (``crdt.CompactChanges``) or as built tuples."""

from __future__ import annotations

import pytest

from corrosion.core.changeset import decode_frame, encode
from corrosion.core.ranges import RangeSet
from corrosion.core.store import ChangeList, Store
from crdt import CompactChanges

SCHEMA = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER DEFAULT 0);"
ROW = ("t", b"\x01", "v", 1, 1, 1, b"s", 1, 0)


def test_an_apply_result_reads_as_the_changes_of_the_versions_it_applied(tmp_path):
    src = Store(tmp_path / "src.db")
    src.apply_schema(SCHEMA)
    insert = "INSERT INTO kv (k, v, n) VALUES (?, ?, ?)"
    for i in range(3):  # three versions of three rows (two column changes each)
        _, commit = src.execute_local([(insert, (f"k{i}-{j}", "x", j)) for j in range(3)], ts=i)
        src.install(commit)
    items = list(src.serve(src.actor_id, RangeSet([(1, 3)])))
    src.close()
    want = [tuple(c) for x in items for c in x.changes]
    dst = Store(tmp_path / "dst.db")
    dst.apply_schema(SCHEMA)
    result = dst.apply([decode_frame(encode(x))[1] for x in items])
    dst.close()
    assert len(result.applied) == 3 and len(result.changes) == len(want) == 3 * 2 * 3
    assert list(result.changes) == want and result.changes == want
    assert all(type(c) is tuple for c in result.changes)
    assert result.changes[0] == want[0] and result.changes[-2:] == want[-2:]


def test_a_change_list_is_its_parts_end_to_end():
    compact = CompactChanges((("t", b"\x02", "v", 2, 1, None, 1, 0),), b"s", 3)
    changes = ChangeList([ROW])
    changes += compact
    changes.extend(iter([ROW]))  # an iterator is read once, as it comes
    changes.extend(())
    nine = [ROW, ("t", b"\x02", "v", 2, 1, 3, b"s", 1, 0), ROW]
    assert len(changes) == 3 and list(changes) == nine and changes == nine
    assert changes[1] == nine[1] and changes[1:] == nine[1:] and changes != nine[:2]
    assert changes != "not changes" and not ChangeList() and ChangeList() == []
    assert repr(ChangeList([ROW])) == f"ChangeList({[ROW]!r})"
    with pytest.raises(TypeError):
        hash(changes)  # a list, as the one it stands for
