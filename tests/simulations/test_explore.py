"""The exhaustive explorer (simulations.explore) over the real replication core: the default
bounded model holds every invariant, the two ways of reaching a state agree, and bugs planted in
the core's bookkeeping (by monkeypatch, in this process only) are found with short traces that
replay."""

from __future__ import annotations

import dataclasses

import pytest

from corrosion.core import store as store_module
from corrosion.core.bookie import Booked, Bookie, Partial
from corrosion.core.ranges import RangeSet
from corrosion.core.replication import Replicator
from simulations.explore import (
    ExploreConfig,
    ExploreViolation,
    Model,
    NotEnabled,
    Write,
    default_writes,
    explore,
    replay,
)

# a small model for the planted bugs: node 0 writes a two-chunk transaction then a row, node 1
# the same row; one loss, one crash, one sync round; the apply loop a step of its own
SMALL = ExploreConfig(
    writes=(default_writes(1, per_node=2)[0], default_writes(2)[1]),
    apply_inline=False,
    max_depth=6,
)


@pytest.mark.slow
def test_default_model_holds_every_invariant():
    """About a minute: every interleaving of a two-chunk write and a one-row write on two nodes,
    with one loss (or sync stream cut), one crash-restart and one sync round anywhere."""
    result = explore(ExploreConfig())
    assert result.violation is None, result.violation.report()
    assert result.complete
    assert result.states > 1000 and result.end_states > 100
    # every level of the search found new states, down to the deepest
    assert result.depth >= 8 and all(n > 0 for n in result.levels)
    assert result.states == sum(result.levels)


def test_replay_and_snapshot_modes_reach_the_same_states():
    tiny = ExploreConfig(
        writes=(default_writes(1)[0], ()),
        losses=1,
        duplicates=1,
        crashes=1,
        syncs=1,
        max_depth=4,
    )
    by_snapshot = explore(tiny)
    by_replay = explore(dataclasses.replace(tiny, mode="replay"))
    assert by_snapshot.violation is None and by_replay.violation is None
    assert (by_snapshot.states, by_snapshot.transitions, by_snapshot.levels) == (
        by_replay.states,
        by_replay.transitions,
        by_replay.levels,
    )


def test_a_chunked_write_travels_as_several_chunks(tmp_path):
    model = Model(SMALL, tmp_path)
    try:
        model.step(("write", 0))
        frames = [m.label for m in model.net if "n0.v1" in m.label]
        assert len(frames) == 2, frames  # the big transaction: two chunks, [0-1/3] and [2-3/3]
        assert any("[0-1/3]" in f for f in frames) and any("[2-3/3]" in f for f in frames)
    finally:
        model.close()


def test_sync_alone_completes_a_partial_left_by_a_cut_stream(tmp_path):
    config = ExploreConfig(
        writes=(default_writes(1, chunks=3)[0], ()), broadcast=False, syncs=2, crashes=1
    )
    result = explore(config)
    assert result.violation is None, result.violation.report()
    assert result.complete and result.end_states > 10

    model = Model(config, tmp_path)

    def only(kind: str) -> str:
        (label,) = [m.label for m in model.net if m.kind == kind]
        return label

    try:
        model.step(("write", 0))
        assert not model.net  # sync only: nothing is broadcast
        model.step(("sync", 1))
        model.step(("deliver", only("sync-req")))
        model.step(("cut", only("sync-reply"), 1))  # one chunk of three arrives
        partial = model.nodes[1].store.bookie.actors[model.sites[0]]
        assert list(partial.partials) == [1] and not partial.held
        model.step(("sync", 1))
        model.step(("deliver", only("sync-req")))
        model.step(("deliver", only("sync-reply")))
        assert model.nodes[1].store.bookie.holds(model.sites[0], 1)
        assert not model.nodes[1].store.bookie.actors[model.sites[0]].partials
    finally:
        model.close()


def test_replay_of_a_correct_trace_passes_and_bad_actions_are_refused():
    trace = [("write", 0), ("write", 0), ("crash", 0)]
    replay(trace, SMALL)  # heal afterwards converges
    with pytest.raises(ValueError, match="no crash left"):
        replay([*trace, ("crash", 1)], SMALL)
    with pytest.raises(NotEnabled, match="no message"):
        replay([("deliver", "frame 0>1 nothing")], SMALL)


def found(config: ExploreConfig, invariant: str, max_len: int) -> list:
    result = explore(config)
    assert result.violation is not None, f"the planted bug went unnoticed: {result.summary()}"
    v = result.violation
    assert v.invariant == invariant, v.report()
    assert len(v.trace) <= max_len, v.report()
    with pytest.raises(ExploreViolation) as again:  # the printed trace replays to it
        replay(v.trace, config)
    assert again.value.invariant == invariant
    return v.trace


def test_a_printed_trace_is_a_regression_test(monkeypatch):
    # as printed for the partial-completed-early bug below
    trace = [
        ("write", 0),
        ("deliver", "frame 0>1 n0.v1[0-1/3] #12f4ec03"),
        ("apply", 1),
    ]
    replay(trace, SMALL)  # the real core: fine, and converges after heal
    monkeypatch.setattr(Partial, "complete", property(lambda self: bool(self.seqs)))
    with pytest.raises(ExploreViolation, match=r"applied-when-complete: node 1 holds n0\.v1"):
        replay(trace, SMALL)
    with pytest.raises(ExploreViolation, match="applied-when-complete"):  # hashes may go stale
        replay([trace[0], ("deliver", "frame 0>1 n0.v1[0-1/3]"), trace[2]], SMALL)


def test_an_exception_in_the_core_is_a_violation_with_its_trace(monkeypatch):
    def broken(self, addr, data, now):
        raise RuntimeError("boom")

    monkeypatch.setattr(Replicator, "handle_sync_frame", broken)
    config = ExploreConfig(writes=(default_writes(1)[0], ()), crashes=0, liveness="all")
    with pytest.raises(ExploreViolation, match="RuntimeError: boom"):
        replay(found(config, "no-exception", 4), config)


def test_planted_gap_not_recorded_is_found(monkeypatch):
    monkeypatch.setattr(store_module.Store, "_write_gaps", lambda self, actor, booked: None)
    trace = found(SMALL, "bookkeeping", 4)
    assert trace[:2] == [("write", 0), ("write", 0)]  # version 2 first: version 1 is a gap


def test_planted_gaps_hidden_from_sync_are_found_by_liveness(monkeypatch):
    monkeypatch.setattr(Booked, "gaps", lambda self: RangeSet())
    two_rows = ExploreConfig(
        writes=(tuple(Write(k, ((f"INSERT INTO kv (k) VALUES ('{k}')", ()),)) for k in "ab"), ()),
        losses=1,
        duplicates=0,
        crashes=0,
        syncs=0,
    )
    trace = found(two_rows, "converges", 4)
    assert any(a[0] == "drop" for a in trace)  # the first version was lost; sync never asks


def test_planted_partial_left_behind_by_sync_is_found_by_liveness(monkeypatch):
    # the bug nothing else caught: sync serves a peer only the versions it lacks entirely, so a
    # version left partial by a lost chunk is never completed
    real = Bookie.missing_for

    def missing_but_partials(self, theirs):
        out = real(self, theirs)
        for actor, lack in out.items():
            for v in theirs.get(actor, {}).get("partials", {}):
                lack.remove(v, v)
        return {a: lack for a, lack in out.items() if lack}

    monkeypatch.setattr(Bookie, "missing_for", missing_but_partials)
    one_big = ExploreConfig(writes=(default_writes(1)[0], ()), crashes=0, syncs=0)
    trace = found(one_big, "converges", 3)
    assert trace[0] == ("write", 0) and any(a[0] == "drop" for a in trace)


def test_planted_partial_completed_early_is_found(monkeypatch):
    monkeypatch.setattr(Partial, "complete", property(lambda self: bool(self.seqs)))
    trace = found(SMALL, "applied-when-complete", 3)
    assert trace[-1] == ("apply", 1)


def test_planted_heads_past_a_missing_version_are_found(monkeypatch):
    real = store_module.Store._apply

    def apply_marking_everything_below(self, items, *, isolate):
        result = real(self, items, isolate=isolate)
        for booked in result.booked.values():
            booked.held.add(1, booked.max())
        return result

    monkeypatch.setattr(store_module.Store, "_apply", apply_marking_everything_below)
    found(SMALL, "bookkeeping", 3)


def test_planted_partials_forgotten_at_restart_are_found(monkeypatch):
    real = store_module.Store._load_bookie

    def load_without_partials(self):
        bookie = real(self)
        for booked in bookie.actors.values():
            booked.partials.clear()
        return bookie

    monkeypatch.setattr(store_module.Store, "_load_bookie", load_without_partials)
    trace = found(SMALL, "heads-grow", 4)
    assert trace[-1] == ("crash", 1)
