"""Counters kept for ``/metrics`` that no other part of the agent keeps: committed changes by
table and source, the changes each subscription's tables saw, and bucketed histograms.

Everything here is updated on the event loop (after a commit or an apply is installed) and read
at scrape time; it costs a dictionary update per changed table per commit.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from operator import itemgetter
from typing import Any

_TABLE_OF = itemgetter(0)  # a change's table

# corrosion's histogram buckets (seconds), from 1 ms to 60 s
BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.025, 0.05, 0.1, 0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Histogram:
    """A Prometheus histogram: observations counted in cumulative buckets, with their sum."""

    def __init__(self, bounds: Sequence[float] = BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def observe_many(self, values: Sequence[float]) -> None:
        counts, bounds = self._counts, self.bounds
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
        self.count += len(values)
        self.sum += sum(values)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` for every bound, then ``(inf, count)``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self._counts, strict=True):
            running += n
            out.append((bound, running))
        return out


# sizes per sync session: changes, and bytes (powers of 4 from 1 KiB to 256 MiB)
CHANGE_BUCKETS: tuple[float, ...] = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
BYTE_BUCKETS: tuple[float, ...] = tuple(float(1024 * 4**i) for i in range(10))


class SyncTelemetry:
    """Each sync session's duration, and the changes and bytes it carried, by ``role``
    (``client``: this node asked; ``server``: it answered a peer) and, for the duration,
    ``outcome`` (``ok`` or ``error``)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], Histogram] = {}
        self.changes: dict[str, Histogram] = {}
        self.bytes: dict[str, Histogram] = {}

    def session(self, role: str, ok: bool, seconds: float, changes: int, nbytes: int) -> None:
        key = (role, "ok" if ok else "error")
        self.seconds.setdefault(key, Histogram()).observe(max(0.0, seconds))
        self.changes.setdefault(role, Histogram(CHANGE_BUCKETS)).observe(changes)
        self.bytes.setdefault(role, Histogram(BYTE_BUCKETS)).observe(nbytes)


class Telemetry:
    """Changes committed here, by table and source (``local``: this node's transactions,
    ``remote``: applied versions of other actors), as corrosion's ``corro_changes_committed``;
    and per subscription (by its hash) and table, the committed changes on the tables it reads,
    as corrosion's ``corro_subs_changes_matched_count``."""

    def __init__(self) -> None:
        self.changes_committed: Counter[tuple[str, str]] = Counter()
        self.subs_matched: Counter[tuple[str, str]] = Counter()

    def committed(
        self,
        changes: Sequence[Any],
        source: str,
        subscriptions: Iterable[Any],
        tables: Collection[str] = (),
    ) -> None:
        """``tables``: the tables ``changes`` name, when known (an apply batch's): when that is
        one table, nothing is counted change by change."""
        if len(tables) == 1:
            by_table = Counter(dict.fromkeys(tables, len(changes))) if changes else Counter()
        else:  # Changes or plain tuples (crdt.ChangeRow)
            by_table = Counter(map(_TABLE_OF, changes))
        if not by_table:
            return
        for table, n in by_table.items():
            self.changes_committed[(table, source)] += n
        for sub in subscriptions:
            for table in sub.tables & by_table.keys():
                self.subs_matched[(sub.hash, table)] += by_table[table]

    def forget_subscriptions(self, live_hashes: set[str]) -> None:
        """Drop the counts of subscriptions that are gone (at scrape time)."""
        for key in [k for k in self.subs_matched if k[0] not in live_hashes]:
            del self.subs_matched[key]
