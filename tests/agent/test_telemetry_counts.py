"""The committed-changes counters behind ``corro_changes_committed`` and
``corro_subs_changes_matched_count``, as the apply loop and local commits feed them."""

from types import SimpleNamespace

from corrosion.runtime.telemetry import Telemetry


def change(table: str, cid: str) -> tuple:
    return (table, b"\x01\x09\x01", cid, 1, 1, 1, b"s" * 16, 1, 0)


def test_counts_by_table_with_and_without_the_batchs_tables():
    """An apply batch says which tables its changes name: one table is counted without a pass
    over the changes, to the same counts; several (or none said) are counted change by change."""
    subs = [SimpleNamespace(hash="h1", tables={"kv"}), SimpleNamespace(hash="h2", tables={"t"})]
    one_table = [change("kv", "v"), change("kv", "n"), change("kv", "v")]
    two_tables = [change("kv", "v"), change("t", "x"), change("t", "y")]
    hinted, counted = Telemetry(), Telemetry()
    hinted.committed(one_table, "remote", subs, {"kv"})
    counted.committed(one_table, "remote", subs)
    hinted.committed(two_tables, "remote", subs, {"kv", "t"})
    counted.committed(two_tables, "remote", subs)
    hinted.committed([], "remote", subs, {"kv"})  # a batch whose versions were all rejected
    for t in (hinted, counted):
        assert t.changes_committed == {("kv", "remote"): 4, ("t", "remote"): 2}
        assert t.subs_matched == {("h1", "kv"): 4, ("h2", "t"): 2}
