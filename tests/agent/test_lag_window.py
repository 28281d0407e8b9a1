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


def test_a_batch_records_as_its_versions_one_by_one():
    """``record_many`` (one call per apply batch) keeps what ``record`` per version keeps: the
    samples, the histogram and each origin's histogram."""
    stamps = [(stamp(100.0 - d), origin) for d, origin in
              [(0.002, b"a"), (0.3, b"a"), (7.0, b"b"), (-1.0, b"a"), (0.04, None)]]  # fmt: skip
    one_by_one, batched = LagWindow(), LagWindow()
    for hlc_ts, origin in stamps:
        one_by_one.record(100.0, hlc_ts, origin)
    batched.record_many(100.0, stamps)
    assert list(batched._samples) == list(one_by_one._samples)
    for w in (one_by_one, batched):
        assert w.histogram.count == 5 and sorted(w.by_origin) == [b"a", b"b"]
    assert batched.histogram.cumulative() == one_by_one.histogram.cumulative()
    assert abs(batched.histogram.sum - one_by_one.histogram.sum) < 1e-9
    for origin in (b"a", b"b"):
        assert batched.by_origin[origin].cumulative() == one_by_one.by_origin[origin].cumulative()
    assert batched.by_origin[b"a"].count == 3 and batched.p99(100.0) == one_by_one.p99(100.0)
