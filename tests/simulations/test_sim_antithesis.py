"""Properties from corrosion's own Antithesis suite, in the simulator: every subscription's rows
equal a fresh run of its query after heal (corrosion's subscription code, hosted by
``simulations.subscription_core``); the bookkeeping agrees with the tables after every event,
not only at the end (``agent_checks.BookkeepingAtAnyTime``); and the databases are equal byte for
byte, the first differing row named (``crdt_checks.table_dump``). Each is shown to catch a bug
planted by monkeypatching the real code on a fixed seed that passes without it.
"""

from __future__ import annotations

import pytest
from support.planted_bugs import seq_bookkeeping_not_written

import crdt
from corrosion.runtime.subscriptions import Subscription
from simulations import SimulationFailure
from simulations.agent_checks import BookkeepingAtAnyTime
from simulations.agent_load import chunked_run
from simulations.crdt_checks import describe_difference, table_dump

from .test_sim_chunked import files_dir


@pytest.mark.parametrize("seed", range(6))
def test_subscriptions_match_a_fresh_run_after_heal(seed):
    run = chunked_run(seed, files_dir=files_dir())
    assert run.subscription_events > 50, run.describe()  # they saw the workload's changes


def patch_keeps_deleted_rows(monkeypatch) -> None:
    """The incremental re-evaluation drops the old rows of only those changed keys that are
    still in the result: a row whose key was deleted stays in the subscription."""
    original = Subscription.patch

    def patch(self, touched, rows):
        width = self.plan.width
        present = [
            {tuple(row[width:][i] for i in source.hidden) for row in rows}
            for source in self.plan.sources
        ]
        kept = [(s, [pk for pk in pks if pk in present[s]]) for s, pks in touched]
        return original(self, kept, rows)

    monkeypatch.setattr(Subscription, "patch", patch)


def test_a_subscription_bug_is_caught(monkeypatch):
    chunked_run(1, files_dir=files_dir())
    with monkeypatch.context() as m:
        patch_keeps_deleted_rows(m)
        with pytest.raises(SimulationFailure, match=r"subscriptions-match\] .* extra \["):
            chunked_run(1, liveness_timeout=30.0, files_dir=files_dir())


def test_bookkeeping_is_checked_at_any_time_not_only_after_heal(monkeypatch):
    seed = 2
    chunked_run(seed, files_dir=files_dir())
    with monkeypatch.context() as m:
        seq_bookkeeping_not_written(m)
        # the checks at the end alone do not see it: the state after heal is right
        m.setattr(BookkeepingAtAnyTime, "attach", lambda self, world: None)
        chunked_run(seed, liveness_timeout=60.0, files_dir=files_dir())
    with monkeypatch.context() as m:
        seq_bookkeeping_not_written(m)
        with pytest.raises(SimulationFailure) as info:
            chunked_run(seed, liveness_timeout=60.0, files_dir=files_dir())
    violations = info.value.violations
    assert violations and {v.checker for v in violations} == {"agent-bookkeeping-always"}
    assert "in __corro_seq_bookkeeping" in violations[0].message
    assert violations[0].time < 10.0  # while the faults run, not after heal


def test_the_table_dump_is_exact_and_names_the_first_differing_row():
    a, b = crdt.connect(":memory:"), crdt.connect(":memory:")
    for conn in (a, b):
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY NOT NULL, v)")
        crdt.as_crr(conn, "t")
    a.execute("INSERT INTO t VALUES ('x', 1), ('y', 0.1), ('z', X'00ff')")
    b.execute("INSERT INTO t VALUES ('x', 1), ('y', 0.1), ('z', X'00ff')")
    assert table_dump(a) == table_dump(b)
    assert table_dump(a)[:3] == [b"t('x'): 'x' | 1", b"t('y'): 'y' | 0.1", b"t('z'): 'z' | X'00FF'"]
    b.execute("UPDATE t SET v = '0.1' WHERE k = 'y'")  # the same digits, another type
    said = describe_difference("n0", table_dump(a), "n1", table_dump(b))
    assert said == (
        "first difference at line 2: n0 has t('y'): 'y' | 0.1; n1 has t('y'): 'y' | '0.1'"
    )
    b.execute("DELETE FROM t WHERE k = 'z'")
    b.execute("UPDATE t SET v = 0.1 WHERE k = 'y'")
    said = describe_difference("n0", table_dump(a), "n1", table_dump(b))
    assert said.startswith("first difference at line 3: n0 has t('z'): 'z' | X'00FF'; n1 has clock")
