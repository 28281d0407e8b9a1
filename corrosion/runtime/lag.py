"""Replication lag as ``/v1/health`` reports it: the p99, over a sliding window, of how old a
version was (its origin's hybrid-logical-clock time) when this node applied it.

corrosion keeps a histogram over 120 s for the same figure; a bounded window of samples gives the
same answer without buckets. Lag across machines includes their clock skew, as it does upstream.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from ..core.hlc import COUNTER_BITS
from .telemetry import Histogram

WINDOW_S = 120.0
MAX_SAMPLES = 4096


class LagWindow:
    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        # every lag since start, bucketed: corrosion's corro_agent_changes_commit_lag_seconds
        self.histogram = Histogram()
        self.by_origin: dict[bytes, Histogram] = {}  # the same, by the actor that committed it

    def record(self, now_s: float, hlc_ts: int, origin: bytes | None = None) -> None:
        """A version stamped ``hlc_ts`` at its origin (actor ``origin``) was applied here at
        ``now_s``."""
        self.record_many(now_s, [(hlc_ts, origin)])

    def record_many(self, now_s: float, stamps: Iterable[tuple[int, bytes | None]]) -> None:
        """``record`` for each ``(hlc_ts, origin)`` of versions applied together at ``now_s``
        (an apply batch: one call, not one per version)."""
        samples, by_origin = self._samples, self.by_origin
        lags: list[float] = []
        origin_lags: dict[bytes, list[float]] = {}
        last_origin, last_lags = None, lags  # a batch's versions mostly share their origin
        for hlc_ts, origin in stamps:
            lag = now_s - (hlc_ts >> COUNTER_BITS) / 1000.0
            if lag < 0.0:
                lag = 0.0
            samples.append((now_s, lag))
            lags.append(lag)
            if origin is not None:
                if origin != last_origin:
                    last_origin, last_lags = origin, origin_lags.setdefault(origin, [])
                last_lags.append(lag)
        self.histogram.observe_many(lags)
        for origin, values in origin_lags.items():
            histogram = by_origin.get(origin)
            if histogram is None:
                histogram = by_origin[origin] = Histogram()
            histogram.observe_many(values)

    def p99(self, now_s: float) -> float:
        """Seconds; 0.0 when nothing was applied within the window."""
        horizon = now_s - self.window_s
        samples = self._samples
        while samples and samples[0][0] < horizon:
            samples.popleft()
        if not samples:
            return 0.0
        lags = sorted(lag for _at, lag in samples)
        return lags[min(len(lags) - 1, math.ceil(0.99 * len(lags)) - 1)]
