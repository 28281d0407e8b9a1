"""VOPR-style sweep: 200 seeds, each a small world through a safety phase with faults (every
scenario, 3-10 nodes) and a liveness phase, with every SWIM checker. A failure prints the seed,
the derived configuration and the command that replays it."""

from __future__ import annotations

import pytest

from simulations import SCENARIOS, derive
from simulations.runner import run

NAMES = sorted(SCENARIOS)
SEEDS = range(200)


def config_for(seed: int):
    scenario = NAMES[seed % len(NAMES)]
    nodes = 3 + (seed // len(NAMES)) % 8
    # push/pull every 10 s so a healed partition merges within a short liveness phase
    return derive(seed, nodes, 60.0, scenario, overrides={"push_pull_interval": 10.0})


@pytest.mark.parametrize("seed", SEEDS)
def test_seed(seed):
    result = run(config_for(seed))
    if result.failure is not None:
        raise result.failure
    assert result.settled
    assert result.world.now >= 60.0
