"""The agent process's heap after start-up (corrosion.ops.heap)."""

from __future__ import annotations

import gc
import weakref

from corrosion.ops.heap import settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_settle_heap_frees_start_up_garbage_and_freezes_the_survivors() -> None:
    garbage = _Node()
    gone = weakref.ref(garbage)
    kept = _Node()
    del garbage
    frozen_before = gc.get_freeze_count()
    try:
        settle_heap()
        assert gone() is None
        assert gc.get_freeze_count() > frozen_before
        assert all(o is not kept for o in gc.get_objects())  # frozen: out of the collector's sight
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
