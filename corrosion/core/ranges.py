"""Sets of integers kept as sorted, disjoint, inclusive ranges (versions held, gaps, seqs)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


class RangeSet:
    """A set of ints stored as merged ``[start, end]`` ranges; adjacent ranges coalesce."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for s, e in ranges:
            self.add(s, e)

    def __repr__(self) -> str:
        return f"RangeSet({self.ranges()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self.ranges() == other.ranges()

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def copy(self) -> RangeSet:
        out = RangeSet()
        out._starts = list(self._starts)
        out._ends = list(self._ends)
        return out

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in self)

    def max(self) -> int:
        return self._ends[-1] if self._ends else 0

    def min(self) -> int:
        return self._starts[0] if self._starts else 0

    def __contains__(self, v: int) -> bool:
        i = bisect_right(self._starts, v) - 1
        return i >= 0 and self._ends[i] >= v

    def covers(self, start: int, end: int) -> bool:
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def add(self, start: int, end: int) -> None:
        if end < start:
            return
        starts, ends = self._starts, self._ends
        if starts and start >= starts[-1]:
            # at or past the last range, as versions mostly arrive: nothing after it to merge
            if start <= ends[-1] + 1:
                if end > ends[-1]:
                    ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
            return
        i = bisect_right(starts, start) - 1
        # merge with a range that overlaps or touches on the left
        if i >= 0 and ends[i] >= start - 1:
            start = starts[i]
            end = max(end, ends[i])
            lo = i
        else:
            lo = i + 1
        hi = lo
        while hi < len(starts) and starts[hi] <= end + 1:
            end = max(end, ends[hi])
            hi += 1
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def remove(self, start: int, end: int) -> None:
        if end < start:
            return
        new_s: list[int] = []
        new_e: list[int] = []
        for s, e in self:
            if e < start or s > end:
                new_s.append(s)
                new_e.append(e)
                continue
            if s < start:
                new_s.append(s)
                new_e.append(start - 1)
            if e > end:
                new_s.append(end + 1)
                new_e.append(e)
        self._starts, self._ends = new_s, new_e

    def union(self, other: RangeSet) -> RangeSet:
        out = self.copy()
        for s, e in other:
            out.add(s, e)
        return out

    def difference(self, other: RangeSet) -> RangeSet:
        out = self.copy()
        for s, e in other:
            out.remove(s, e)
        return out

    def complement_within(self, start: int, end: int) -> RangeSet:
        """The values of ``[start, end]`` not in this set (e.g. the gaps below a head)."""
        out = RangeSet([(start, end)]) if end >= start else RangeSet()
        return out.difference(self)

    def values(self, limit: int | None = None) -> Iterator[int]:
        n = 0
        for s, e in self:
            for v in range(s, e + 1):
                if limit is not None and n >= limit:
                    return
                yield v
                n += 1
