"""Versions of many chunks through the simulator (``simulations.agent_load``): big transactions and
large values, chunks lost, doubled and reordered on the replication channel, links on which only
sync can deliver, a crash with versions held in part, every node cut off while a last version's
chunks fly. After heal: equal databases, no version partial or missing anywhere, bookkeeping
tables in step with memory.

Planted bugs: each test below breaks the real core by monkeypatching one of its methods (never
its code) and checks that the chunked workload catches it on a fixed seed, and that the same seed
passes without it. Single-chunk workloads (``test_sim_agent*.py``) cannot: they never buffer a
chunk. Replay a seed with ``simulations.agent_load.chunked_run(seed)``.
"""

from __future__ import annotations

import dataclasses

import pytest

from corrosion.core import replication, store
from corrosion.core.bookie import Bookie, Partial
from corrosion.core.ranges import RangeSet
from simulations import SimulationFailure
from simulations.agent_load import chunked_run

SEEDS = range(24)
SHM = "/dev/shm"  # SQLite's fsyncs cost nothing there (the runs are the same elsewhere)


def files_dir() -> str | None:
    import os

    return SHM if os.path.isdir(SHM) else None


@pytest.mark.parametrize("seed", SEEDS)
def test_chunked_seed(seed):
    run = chunked_run(seed, files_dir=files_dir())
    # the workload reaches the hard paths: chunked versions, chunks lost and doubled on the
    # wire, versions held in part for a while
    assert run.chunked_versions >= 5, run.describe()
    assert run.chunk_frames_lost > 0 and run.chunk_frames_doubled > 0, run.describe()
    assert run.partial_peak > 0, run.describe()


def test_sync_alone_completes_the_versions_left_in_part_at_heal():
    run = chunked_run(13, files_dir=files_dir())
    assert run.partial_at_heal >= 3, run.describe()  # and yet the run passed: sync did it
    again = chunked_run(13, files_dir=files_dir())
    assert again.digest == run.digest and again.describe() == run.describe()


# -- planted bugs ------------------------------------------------------------------------------


def complete_when_its_last_seq_is_held(monkeypatch) -> None:
    """A partial version counts as complete as soon as its last seq is held: when the last chunk
    arrives before the others, the version is applied without them."""
    monkeypatch.setattr(Partial, "complete", property(lambda self: self.last_seq in self.seqs))


class _OnePastTheEnd(RangeSet):
    def add(self, start: int, end: int) -> None:
        super().add(start, end + 1)


def seq_ranges_booked_one_past_their_end(monkeypatch) -> None:
    """A received chunk's seq range is booked one seq too far (its inclusive end taken as
    exclusive): a version missing only a one-seq chunk (a large value's) looks complete."""
    original = Partial.__init__

    def init(self, last_seq: int, ts: int, seqs: RangeSet | None = None) -> None:
        booked = _OnePastTheEnd()
        for s, e in seqs or ():
            RangeSet.add(booked, s, e)  # ranges copied from a booked partial, as they are
        original(self, last_seq, ts, booked)

    monkeypatch.setattr(Partial, "__init__", init)


def sync_ignores_partial_versions(monkeypatch) -> None:
    """A sync server takes the requester's partial versions for held ones, so it never sends
    their missing chunks: a version left in part by lost chunks stays so."""
    original = Bookie.missing_for

    def missing_for(self, theirs):
        return original(self, {a: {**st, "partials": {}} for a, st in theirs.items()})

    monkeypatch.setattr(Bookie, "missing_for", missing_for)


def chunks_cut_at_their_changes(monkeypatch) -> None:
    """A chunk's seq range ends at its last change's seq and the next starts at its first
    change's: seqs superseded between two chunks of a served version belong to no chunk, so the
    receiver never holds the whole range."""
    original = store.chunk_version

    def chunk_version(*args, **kwargs):
        chunks = original(*args, **kwargs)
        out = []
        for i, c in enumerate(chunks):
            lo = c.changes[0].seq if i > 0 and c.changes else c.seqs[0]
            hi = c.changes[-1].seq if i < len(chunks) - 1 and c.changes else c.seqs[1]
            out.append(dataclasses.replace(c, seqs=(lo, hi)))
        return out

    monkeypatch.setattr(store, "chunk_version", chunk_version)
    monkeypatch.setattr(replication, "chunk_version", chunk_version)


# bug -> (seed that catches it, what the checkers must say)
PLANTED = {
    complete_when_its_last_seq_is_held: (0, r"crdt-convergence\] .* databases differ"),
    # caught at the first chunk it books, long before heal: memory and table disagree at once
    seq_ranges_booked_one_past_their_end: (0, r"agent-bookkeeping-always\] .* partial seqs"),
    sync_ignores_partial_versions: (0, r"agent-bookkeeping\] .* in part"),
    chunks_cut_at_their_changes: (5, r"agent-bookkeeping\] .* in part"),
}


@pytest.mark.parametrize("plant", list(PLANTED), ids=lambda f: f.__name__)
def test_a_planted_bug_is_caught_by_the_chunked_workload(plant, monkeypatch):
    seed, expected = PLANTED[plant]
    chunked_run(seed, files_dir=files_dir())  # passes without the bug
    with monkeypatch.context() as m:
        plant(m)
        with pytest.raises(SimulationFailure, match=expected) as info:
            chunked_run(seed, liveness_timeout=60.0, files_dir=files_dir())
    assert f"chunked_run({seed})" in str(info.value)
