"""Pausing Python's cyclic garbage collector around bulk work that creates no cycles.

Reading or merging 100k changes allocates hundreds of thousands of container objects (``Change``
tuples, clock lists, row dicts). Each allocation burst triggers collections, and the full ones
traverse every tracked object alive in the process, such as the changes a caller still holds.
``Change`` is a tuple subclass, which CPython never untracks. Measured in bench/crdt_bench.py
with a realistic live heap, collection took about a third of a merge. This work frees nothing
that needs the cycle collector (reference counting frees it), so the collector waits until the
batch is done, then runs as usual.

The pause is process-wide: other threads see no collections for its duration, a few hundred
milliseconds at most. If the collector was already disabled, it is left alone. Nested or
concurrent pauses only ever re-enable a collector that was enabled when they began.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
