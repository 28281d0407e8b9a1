"""Power cuts in a world of agents (``simulations.power_cuts``): nodes crash through the
fault-injecting VFS, mid-operation or between events, and restart from what their disk kept. After
every restart the bookkeeping agrees with the data and, under ``synchronous = FULL`` (the
agent's), nothing acknowledged is lost; in the end the cluster converges byte for byte.
"""

from __future__ import annotations

import pytest

from simulations import SimulationFailure
from simulations.agent_core import AgentCore
from simulations.power_cuts import power_cut_run

from .test_sim_chunked import files_dir

SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
def test_full_loses_nothing_acknowledged_and_converges(seed):
    run = power_cut_run(seed, files_dir=files_dir())
    assert run.cuts >= 3 and run.mid_operation >= 1, run.describe()
    assert run.lost_acked == 0 and run.acked > 40, run.describe()


def test_some_cuts_tear_a_write():
    runs = [power_cut_run(seed, files_dir=files_dir()) for seed in (2, 3)]
    assert all(r.torn > 0 for r in runs)


def test_normal_restarts_consistent_but_loses_acknowledged_writes():
    """corrosion's own setting: the bookkeeping still agrees with the data after every cut,
    but acknowledged versions go (so FULL's zero above means something)."""
    runs = [
        power_cut_run(seed, synchronous="NORMAL", check_convergence=False, files_dir=files_dir())
        for seed in (0, 3)
    ]
    assert all(r.lost_acked > 0 for r in runs)


def test_a_run_replays_from_its_seed():
    first = power_cut_run(4, files_dir=files_dir())
    again = power_cut_run(4, files_dir=files_dir())
    assert first.injected == again.injected and first.log == again.log


def test_a_store_that_does_not_sync_is_caught(monkeypatch):
    original = AgentCore.__init__

    def unsynced(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.store.conn.execute("PRAGMA synchronous = OFF")

    monkeypatch.setattr(AgentCore, "__init__", unsynced)
    with pytest.raises(SimulationFailure, match=r"power-cut\] .* (lost under|cannot reopen)"):
        power_cut_run(0, files_dir=files_dir())
