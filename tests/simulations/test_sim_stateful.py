"""Hypothesis chooses the operations and faults; failing schedules shrink to a few steps."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from simulations import SimulationFailure
from simulations.strategies import CrdtMachine, SwimMachine, fault_schedules, link_models
from swim.core import Membership

MACHINE = settings(
    max_examples=100,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestSwim = SwimMachine.TestCase
TestSwim.settings = MACHINE

TestCrdt = CrdtMachine.TestCase
TestCrdt.settings = settings(MACHINE, max_examples=30, stateful_step_count=15)


def test_a_broken_core_is_caught_and_the_schedule_shrinks(monkeypatch):
    """Refutations that forget to raise the incarnation: the machine must find it and report
    the seed and the steps."""
    original = Membership._refute

    def broken(self, accused):
        original(self, accused)
        self._inc = max(self._inc - 1, 0)  # the bug: refute at the accused incarnation

    monkeypatch.setattr(Membership, "_refute", broken)
    with pytest.raises(SimulationFailure) as info:
        run_state_machine_as_test(
            SwimMachine,
            settings=settings(
                MACHINE,
                max_examples=60,
                stateful_step_count=10,
                database=None,
                derandomize=True,  # a fixed search: whether the bug is found is not luck
                report_multiple_bugs=False,
                phases=[Phase.generate, Phase.shrink],  # skip "explain": it reruns a lot
            ),
        )
    text = str(info.value)
    assert "swim-" in text and "steps so far" in text and "swim_world(seed=" in text


def test_strategies_build_valid_links_and_schedules():
    from hypothesis import given

    @settings(max_examples=30, deadline=None)
    @given(link_models(), fault_schedules(5, 60.0))
    def check(link, schedule):
        assert 0 <= link.loss <= 0.2 and link.delay.low <= link.delay.max
        assert all(0 <= e.time <= 60.0 for e in schedule)
        assert all(0 <= e.node < 5 for e in schedule if e.action in ("crash", "restart"))

    check()
