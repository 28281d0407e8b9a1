"""The replication core's bookkeeping types against plain Python sets: ``RangeSet`` (versions held,
gaps, seqs) and ``Bookie`` (per actor: held, partial, gaps, sync state, what a peer lacks).
Hypothesis drives random operations; every answer must equal the one computed on a set of ints.
Fast (well under a second): the targeted tests of ``bench/mutation_score.py --module core-ranges``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corrosion.core.bookie import Booked, Bookie, Partial, validate_sync_state
from corrosion.core.ranges import RangeSet

small = st.integers(min_value=0, max_value=40)
spans = st.tuples(small, small)
ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), spans), max_size=25)


def model_of(ops_) -> tuple[RangeSet, set[int]]:
    rs, model = RangeSet(), set()
    for op, (s, e) in ops_:
        getattr(rs, op)(s, e)
        values = set(range(s, e + 1))
        model = model | values if op == "add" else model - values
    return rs, model


def runs(values: set[int]) -> list[tuple[int, int]]:
    """``values`` as maximal inclusive runs."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v - 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


@settings(max_examples=80, deadline=None)
@given(ops, spans, small)
def test_a_range_set_is_the_set_of_its_values(ops_, probe, v):
    rs, model = model_of(ops_)
    assert rs.ranges() == runs(model) == list(rs)  # merged, sorted, adjacent runs coalesced
    assert len(rs) == len(model)
    assert bool(rs) == bool(model)
    assert rs.max() == max(model, default=0) and rs.min() == min(model, default=0)
    assert (v in rs) == (v in model)
    s, e = min(probe), max(probe)
    assert rs.covers(s, e) == (set(range(s, e + 1)) <= model)
    assert list(rs.values()) == sorted(model)
    assert list(rs.values(limit=3)) == sorted(model)[:3]
    assert set(RangeSet(rs.ranges()).values()) == model and RangeSet(rs.ranges()) == rs
    within = rs.complement_within(s, e)
    assert set(within.values()) == set(range(s, e + 1)) - model
    assert repr(rs) == f"RangeSet({runs(model)!r})"


@settings(max_examples=60, deadline=None)
@given(ops, ops)
def test_union_difference_and_copy_are_set_operations(a_ops, b_ops):
    a, ma = model_of(a_ops)
    b, mb = model_of(b_ops)
    before = a.ranges()
    assert set(a.union(b).values()) == ma | mb
    assert set(a.difference(b).values()) == ma - mb
    assert a.ranges() == before  # neither changes its operand
    c = a.copy()
    c.add(100, 101)
    assert a.ranges() == before and 100 in c
    assert (a == b) == (ma == mb)
    assert a != before  # only another RangeSet can be equal


def test_empty_and_reversed_spans_change_nothing():
    rs = RangeSet([(3, 5)])
    rs.add(9, 8)
    rs.remove(5, 4)
    assert rs.ranges() == [(3, 5)]
    assert rs.complement_within(5, 4) == RangeSet()
    assert not rs.covers(6, 7) and not rs.covers(2, 3) and rs.covers(4, 5)
    assert RangeSet().max() == 0 == RangeSet().min() and not RangeSet()


def test_adjacent_and_overlapping_spans_coalesce():
    rs = RangeSet([(1, 2), (4, 5)])
    rs.add(3, 3)
    assert rs.ranges() == [(1, 5)]
    rs = RangeSet([(1, 2), (10, 12), (20, 30)])
    rs.add(5, 21)
    assert rs.ranges() == [(1, 2), (5, 30)]
    rs.remove(1, 1)
    rs.remove(30, 30)
    rs.remove(10, 10)
    assert rs.ranges() == [(2, 2), (5, 9), (11, 29)]


def test_spans_added_in_order_at_the_end_coalesce_as_anywhere():
    # versions mostly arrive in order: add's shortcut for the last range
    rs = RangeSet()
    for v in (1, 2, 3, 5, 5, 4, 7):
        rs.add(v, v)
    assert rs.ranges() == [(1, 5), (7, 7)]
    rs.add(8, 9)  # touching the last range
    rs.add(7, 8)  # inside it
    rs.add(9, 12)  # overlapping its end
    rs.add(14, 14)  # past it, with a gap
    assert rs.ranges() == [(1, 5), (7, 12), (14, 14)]


# -- the bookie ---------------------------------------------------------------------------


A, B, C, D = b"a" * 16, b"b" * 16, b"c" * 16, b"d" * 16


def test_a_partial_is_complete_when_every_seq_up_to_the_last_is_held():
    p = Partial(last_seq=9, ts=1)
    assert not p.complete
    p.seqs.add(0, 4)
    p.seqs.add(6, 9)
    assert not p.complete
    p.seqs.add(5, 5)
    assert p.complete
    assert Partial(0, 1, RangeSet([(0, 0)])).complete
    assert not Partial(3, 1, RangeSet([(1, 3)])).complete


@settings(max_examples=60, deadline=None)
@given(
    st.sets(st.integers(1, 30), max_size=12),
    st.dictionaries(st.integers(1, 30), st.integers(0, 5), max_size=4),
)
def test_gaps_are_the_versions_below_the_max_neither_held_nor_partial(held, partials):
    booked = Booked()
    for v in held:
        booked.held.add(v, v)
    for v, last in partials.items():
        booked.partials[v] = Partial(last, 0)
    top = max(held | set(partials), default=0)
    assert booked.max() == top
    assert set(booked.gaps().values()) == set(range(1, top + 1)) - held - set(partials)
    copy = booked.copy()
    copy.held.add(50, 50)
    for p in copy.partials.values():
        p.seqs.add(0, 0)
    assert 50 not in booked.held and all(not p.seqs for p in booked.partials.values())
    assert copy.partials.keys() == booked.partials.keys()
    for v, p in booked.partials.items():
        assert (copy.partials[v].last_seq, copy.partials[v].ts) == (p.last_seq, p.ts)


def test_a_copy_keeps_each_partial_whole_and_apart():
    booked = Booked(RangeSet([(1, 2)]), {4: Partial(9, 1234, RangeSet([(0, 3)]))})
    copy = booked.copy()
    assert copy == booked and copy.partials[4] is not booked.partials[4]
    assert copy.partials[4].ts == 1234 and copy.partials[4].seqs == RangeSet([(0, 3)])


def test_the_bookie_answers_per_actor_without_booking_unknown_ones():
    bookie = Bookie()
    assert bookie.head(A) == 0 and not bookie.holds(A, 1) and bookie.actors == {}
    bookie.get(D)  # known first, nothing held: skipped, and the actors after it still answer
    bookie.get(A).held.add(1, 3)
    bookie.get(A).held.add(6, 6)
    bookie.get(A).partials[5] = Partial(4, 7, RangeSet([(0, 1)]))
    bookie.get(B).held.add(2, 2)
    assert bookie.get(A) is bookie.get(A)
    assert bookie.head(A) == 6 and bookie.head(B) == 2 and bookie.head(C) == 0
    assert bookie.holds(A, 3) and not bookie.holds(A, 4) and not bookie.holds(A, 5)
    assert not bookie.holds(C, 1) and C not in bookie.actors
    assert bookie.gap_count() == 1 + 1  # A lacks 4, B lacks 1
    assert bookie.sync_state() == {
        A: {"head": 6, "gaps": [[4, 4]], "partials": {5: [[0, 1]]}},
        B: {"head": 2, "gaps": [[1, 1]], "partials": {}},
    }


def test_missing_for_is_what_we_hold_that_the_peer_lacks():
    ours = Bookie()
    ours.get(C)  # nothing held (and first): never offered, and the others still are
    ours.get(A).held.add(1, 10)
    ours.get(B).held.add(1, 2)
    theirs = {
        A: {"head": 8, "gaps": [[2, 3]], "partials": {5: [[0, 0]]}},
        C: {"head": 4, "gaps": [], "partials": {}},
    }
    missing = ours.missing_for(theirs)
    assert missing == {A: RangeSet([(2, 3), (5, 5), (9, 10)]), B: RangeSet([(1, 2)])}
    assert ours.missing_for({A: {"head": 10}, B: {"head": 2}}) == {}
    assert ours.missing_for({A: {"head": 0}, B: {"head": 2}}) == {A: RangeSet([(1, 10)])}
    assert ours.missing_for({A: {"head": 1}, B: {"head": 2}}) == {A: RangeSet([(2, 10)])}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sets(st.integers(1, 20), max_size=10), min_size=2, max_size=2),
)
def test_sync_state_and_missing_for_agree_with_sets(helds):
    """A peer that takes what ``missing_for`` says it lacks ends up holding our versions."""
    ours, peer = Bookie(), Bookie()
    for bookie, held in zip((ours, peer), helds, strict=True):
        for v in held:
            bookie.get(A).held.add(v, v)
    state = validate_sync_state(peer.sync_state())
    missing = ours.missing_for(state)
    assert set(missing.get(A, RangeSet()).values()) == helds[0] - helds[1]


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ([], "sync state must be a map"),
        ({b"short": {"head": 1}}, "sync state entries are 16-byte actor -> map"),
        ({A: []}, "sync state entries are 16-byte actor -> map"),
        ({A: {"head": -1}}, "head must be a non-negative integer"),
        ({A: {"head": True}}, "head must be a non-negative integer"),
        ({A: {"head": 1, "gaps": {}}}, "gaps must be a list, partials a map"),
        ({A: {"head": 1, "partials": []}}, "gaps must be a list, partials a map"),
        ({A: {"head": 1, "gaps": [[1]]}}, r"gap ranges are \[start, end\] integer pairs"),
        ({A: {"head": 1, "gaps": [[1, "2"]]}}, r"gap ranges are \[start, end\] integer pairs"),
        ({A: {"head": 1, "gaps": [(1, 2)]}}, r"gap ranges are \[start, end\] integer pairs"),
        ({A: {"head": 1, "partials": {"1": [[0, 1]]}}}, "partials map versions to seq ranges"),
        ({A: {"head": 1, "partials": {1: {}}}}, "partials map versions to seq ranges"),
    ],
)
def test_a_malformed_sync_state_is_refused_with_what_is_wrong(bad, said):
    with pytest.raises(ValueError, match=f"^{said}$"):
        validate_sync_state(bad)


def test_a_valid_sync_state_is_normalised():
    assert validate_sync_state({A: {"head": 3}}) == {A: {"head": 3, "gaps": [], "partials": {}}}
    assert validate_sync_state({A: {"head": 0}}) == {A: {"head": 0, "gaps": [], "partials": {}}}
    state = {A: {"head": 3, "gaps": [[1, 2]], "partials": {3: [[0, 4]]}, "extra": 1}}
    del state[A]["extra"]
    assert validate_sync_state({A: {**state[A], "extra": 1}}) == state
