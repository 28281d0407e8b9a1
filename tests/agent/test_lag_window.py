"""The p99 replication lag behind /v1/health: a sliding window of apply delays."""

from corrosion.runtime.lag import LagWindow


def stamp(seconds: float) -> int:
    return int(seconds * 1000) << 16


def test_p99_of_the_window_and_expiry():
    w = LagWindow(window_s=120)
    assert w.p99(1000.0) == 0.0
    for i in range(100):
        w.record(1000.0, stamp(1000.0 - (0.01 if i < 99 else 5.0)))
    assert (
        abs(w.p99(1000.0) - 0.01) < 1e-3
    )  # the single 5 s outlier is the 100th percentile, not the 99th
    w.record(1000.0, stamp(995.0))
    assert abs(w.p99(1000.0) - 5.0) < 1e-3
    assert w.p99(1121.0) == 0.0  # every sample is older than the window


def test_future_stamps_count_as_no_lag():
    w = LagWindow()
    w.record(10.0, stamp(12.0))  # the origin's clock runs ahead of ours
    assert w.p99(10.0) == 0.0
