"""Compaction of a machine's step log and what stays readable after it: ``timeline()`` (the
``events`` endpoint) must tell every run the same way whether it was folded into ``history`` or
not, ``sizes()`` must count what is left, and only finished runs beyond the newest ``keep`` are
ever folded. Fast: real SQLite files, no engine."""

from __future__ import annotations

import pytest

from orchestrator.steplog import EventKind, MachineLog, RunRecord, RunStatus

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def run(log: MachineLog, run_id: str, at: float, *, status=RunStatus.SUCCEEDED, trace=None):
    """A run of two steps: ``a`` fails once then completes, ``b`` completes; then FINISH."""
    log.start_run(
        RunRecord(run_id, "start", ("a", "b"), ("fin",), {"n": at}, at, trace or {}),
        exclusive=False,
    )
    log.append(run_id, EventKind.ERROR, step="a", payload={"message": "x"}, retry_count=2, at=at)
    log.append(run_id, EventKind.COMPLETE, step="a", payload={"a": 1}, at=at + 0.1)
    if status is RunStatus.CANCELLED:
        log.append(run_id, EventKind.CANCEL, step="b", payload={"kind": "abort"}, at=at + 0.2)
    else:
        log.append(run_id, EventKind.COMPLETE, step="b", at=at + 0.2)
    if status is not RunStatus.ACTIVE:
        error = {"kind": "abort"} if status is RunStatus.CANCELLED else None
        log.finish(run_id, status, error=error, response={"ok": at}, at=at + 0.3)


@pytest.fixture
def log(tmp_path):
    log = MachineLog(tmp_path / "m.sqlite")
    yield log
    log.close()


def test_a_run_reads_the_same_in_the_timeline_before_and_after_compaction(log):
    run(log, "traced", 1.0, trace={"traceparent": TRACEPARENT})
    run(log, "cancelled", 2.0, status=RunStatus.CANCELLED)
    run(log, "kept", 3.0)
    before = log.timeline()
    assert log.compact(keep=1) == 2
    after = log.timeline()
    assert [t["compacted"] for t in before] == [False, False, False]
    assert [t["compacted"] for t in after] == [True, True, False]
    for t in before + after:
        del t["compacted"]
    assert after == before
    traced, cancelled, kept = after
    assert traced == {
        "run_id": "traced",
        "action": "start",
        "steps": ["a", "b"],
        "finalizers": ["fin"],
        "status": "succeeded",
        "created_at": 1.0,
        "finished_at": 1.3,
        "error": None,
        "trace_id": TRACE_ID,
        "events": [
            {"seq": 0, "kind": "start", "step": None, "retry_count": 0, "at": 1.0},
            {"seq": 1, "kind": "error", "step": "a", "retry_count": 2, "at": 1.0},
            {"seq": 2, "kind": "complete", "step": "a", "retry_count": 0, "at": 1.1},
            {"seq": 3, "kind": "complete", "step": "b", "retry_count": 0, "at": 1.2},
            {"seq": 4, "kind": "finish", "step": None, "retry_count": 0, "at": 1.3},
        ],
    }
    assert (cancelled["status"], cancelled["error"], cancelled["trace_id"]) == (
        "cancelled",
        {"kind": "abort"},
        None,
    )
    assert [e["kind"] for e in cancelled["events"]] == [
        "start",
        "error",
        "complete",
        "cancel",
        "finish",
    ]
    assert kept["run_id"] == "kept"


def test_compaction_folds_finished_runs_beyond_keep_and_never_an_active_one(log):
    assert log.sizes() == {"runs": 0, "events": 0, "history": 0}
    run(log, "old-active", 0.0, status=RunStatus.ACTIVE)  # oldest of all, never finished
    for i in range(1, 5):
        run(log, f"done{i}", float(i))
    assert log.sizes() == {"runs": 5, "events": 4 + 4 * 5, "history": 0}
    assert log.compact(keep=2) == 2
    assert log.sizes() == {"runs": 3, "events": 4 + 2 * 5, "history": 2}
    assert [r.run_id for r in log.active_runs()] == ["old-active"]
    assert log.get_run("done1") is None and log.get_run("done2") is None  # folded
    assert log.events("done1") == []
    assert [e.kind for e in log.events("done3")][-1] == EventKind.FINISH
    # the timeline still has every run, oldest first, the active one with its events so far
    assert [(t["run_id"], t["compacted"]) for t in log.timeline()] == [
        ("old-active", False),
        ("done1", True),
        ("done2", True),
        ("done3", False),
        ("done4", False),
    ]
    assert [e["kind"] for e in log.timeline()[0]["events"]] == [
        "start",
        "error",
        "complete",
        "complete",
    ]
    assert log.compact(keep=2) == 0  # nothing more to fold
    assert log.compact(keep=1) == 1
    assert log.sizes() == {"runs": 2, "events": 4 + 5, "history": 3}


@pytest.mark.parametrize("keep", [0, -1])
def test_compaction_keeps_at_least_one_finished_run(log, keep):
    run(log, "done", 1.0)
    with pytest.raises(ValueError, match=r"^compact\(\) keeps at least one finished run$"):
        log.compact(keep=keep)
    assert log.sizes() == {"runs": 1, "events": 5, "history": 0}


@pytest.mark.parametrize(
    ("trace", "trace_id"),
    [
        ({"traceparent": TRACEPARENT}, TRACE_ID),
        ({"traceparent": f"00-{TRACE_ID}-01"}, None),  # malformed: three parts
        ({"tracestate": "k=v"}, None),  # no traceparent
        (None, None),  # untraced
    ],
)
def test_the_timeline_gives_the_trace_id_of_a_run_started_in_a_trace(log, trace, trace_id):
    run(log, "r", 1.0, trace=trace)
    run(log, "newer", 2.0)
    assert log.timeline()[0]["trace_id"] == trace_id
    log.compact(keep=1)
    assert log.timeline()[0]["trace_id"] == trace_id
