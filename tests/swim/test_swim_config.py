"""Presets, validation and the scaling formulas, checked against memberlist's values and tests."""

from __future__ import annotations

import math

import pytest

from swim.config import (
    Config,
    ConfigError,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_timeout,
)
from swim.lifeguard import Awareness, Suspicion
from swim.member import NodeId


def test_presets_match_memberlist_defaults():
    lan, wan, local = Config.lan(), Config.wan(), Config.local()
    assert (lan.probe_interval, lan.probe_timeout, lan.indirect_checks) == (1.0, 0.4, 3)
    assert (lan.retransmit_mult, lan.suspicion_mult, lan.suspicion_max_timeout_mult) == (4, 4, 6)
    assert (lan.gossip_interval, lan.gossip_nodes, lan.gossip_to_the_dead_time) == (0.2, 3, 30.0)
    assert (lan.push_pull_interval, lan.stream_timeout, lan.awareness_max_multiplier) == (
        30.0,
        10.0,
        8,
    )
    assert (lan.max_packet_size, lan.meta_max_size) == (1400, 512)
    assert (wan.probe_interval, wan.probe_timeout, wan.suspicion_mult) == (5.0, 3.0, 6)
    assert (wan.gossip_interval, wan.gossip_nodes, wan.push_pull_interval) == (0.5, 4, 60.0)
    assert (wan.gossip_to_the_dead_time, wan.stream_timeout) == (60.0, 30.0)
    assert (local.probe_interval, local.probe_timeout, local.indirect_checks) == (1.0, 0.2, 1)
    assert (local.retransmit_mult, local.suspicion_mult, local.gossip_interval) == (2, 3, 0.1)
    assert (local.push_pull_interval, local.stream_timeout) == (15.0, 1.0)


def test_overrides_apply_and_revalidate():
    c = Config.lan(label="prod", probe_interval=2.0)
    assert c.label == "prod" and c.probe_interval == 2.0 and c.probe_timeout == 0.4
    assert c.replace(gossip_nodes=5).gossip_nodes == 5
    with pytest.raises(ConfigError, match="probe_timeout"):
        c.replace(probe_timeout=2.0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"probe_interval": 0}, "probe_interval"),
        ({"probe_timeout": -1.0}, "probe_timeout"),
        ({"probe_timeout": 1.0}, "probe_timeout"),
        ({"gossip_interval": float("nan")}, "gossip_interval"),
        ({"indirect_checks": -1}, "indirect_checks"),
        ({"retransmit_mult": 0}, "retransmit_mult"),
        ({"suspicion_mult": 0}, "suspicion_mult"),
        ({"awareness_max_multiplier": 0}, "awareness_max_multiplier"),
        ({"gossip_nodes": 1.5}, "gossip_nodes"),
        ({"gossip_nodes": True}, "gossip_nodes"),
        ({"probe_interval": "1s"}, "probe_interval"),
        ({"push_pull_interval": -1.0}, "push_pull_interval"),
        ({"max_packet_size": 100}, "max_packet_size"),
        ({"max_packet_size": 70000}, "max_packet_size"),
        ({"meta_max_size": 800}, "meta_max_size"),
        ({"label": "x" * 256}, "label"),
        ({"label": 5}, "label"),
        ({"max_stream_size": 10}, "max_stream_size"),
        ({"probe_intervall": 1.0}, "probe_intervall"),
    ],
)
def test_invalid_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        Config.lan(**overrides)


def test_suspicion_timeout_matches_memberlist_util_test():
    # util_test.go: suspicionTimeout(3, n, 1s) / 3, in milliseconds.
    expected = {5: 1000, 10: 1000, 50: 1698, 100: 2000, 500: 2698, 1000: 3000}
    for n, ms in expected.items():
        assert round(suspicion_timeout(3, n, 1.0) / 3 * 1000) == ms


@pytest.mark.parametrize(
    ("preset", "n", "low", "high", "k"),
    [
        ("lan", 10, 4.0, 24.0, 2),
        ("lan", 100, 8.0, 48.0, 2),
        ("lan", 1000, 12.0, 72.0, 2),
        ("wan", 10, 30.0, 180.0, 4),
        ("wan", 100, 60.0, 360.0, 4),
        ("wan", 1000, 90.0, 540.0, 4),
        ("local", 10, 3.0, 18.0, 1),
    ],
)
def test_suspicion_bounds_lan_wan(preset, n, low, high, k):
    got = getattr(Config, preset)().suspicion_bounds(n)
    assert got[0] == pytest.approx(low) and got[1] == pytest.approx(high) and got[2] == k


def test_suspicion_k_is_zero_when_too_few_members_to_confirm():
    # memberlist: k = alpha - 2 unless n - 2 < k (the suspect and us cannot confirm).
    c = Config.lan()
    assert c.suspicion_bounds(3)[2] == 0
    assert c.suspicion_bounds(4)[2] == 2


def test_retransmit_limit_matches_memberlist():
    assert [retransmit_limit(3, n) for n in (0, 1, 99)] == [0, 3, 6]
    lan = Config.lan()
    assert [lan.retransmit_limit(n) for n in (10, 100, 1000, 10000)] == [8, 12, 16, 20]


def test_push_pull_scale_matches_memberlist():
    for n in (1, 32):
        assert push_pull_scale(1.0, n) == 1.0
    for n in (33, 64):
        assert push_pull_scale(1.0, n) == 2.0
    for n in (65, 128):
        assert push_pull_scale(1.0, n) == 3.0
    assert Config.lan().push_pull_period(100) == 90.0
    assert Config.lan().push_pull_period(1000) == 180.0


def test_remaining_suspicion_time_golden_vectors():
    # suspicion_test.go: k = 3, min 2 s, max 30 s, (confirmations, elapsed) -> remaining.
    cases = [(0, 0.0, 30.0), (1, 2.0, 14.0), (2, 3.0, 4.81), (3, 4.0, -2.0), (4, 5.0, -3.0)]
    cases.append((5, 10.0, -8.0))
    for n, elapsed, remaining in cases:
        assert remaining_suspicion_time(n, 3, elapsed, 2.0, 30.0) == pytest.approx(remaining)


def test_suspicion_dogpile_timeouts():
    # state_test.go dogpile: probe 100 ms, alpha 5, beta 2 -> min 0.5 s, max 1 s.
    c = Config.lan(probe_interval=0.1, probe_timeout=0.001, suspicion_mult=5)
    c = c.replace(suspicion_max_timeout_mult=2)
    who = [NodeId("10.0.0.1", 9000 + i, 1) for i in range(6)]
    cases = [(1, 0, 0.5), (2, 0, 0.5), (3, 0, 0.5), (4, 0, 1.0), (5, 0, 1.0)]
    cases += [(5, 1, 0.75), (5, 2, 0.603), (5, 3, 0.5), (5, 4, 0.5)]
    for peers, confirmations, timeout in cases:
        low, high, k = c.suspicion_bounds(peers + 1)
        s = Suspicion(0.0, low, high, k, raised_by=who[0])
        for i in range(confirmations):
            s.confirm(who[1 + i])
        # memberlist measures 604 ms with a 25 ms fudge; the formula gives 603 ms.
        assert s.deadline == pytest.approx(timeout, abs=1e-9), (peers, confirmations)


def test_suspicion_counts_each_confirmer_once_and_not_the_raiser():
    a, b, c = (NodeId("h", p, 1) for p in (1, 2, 3))
    s = Suspicion(10.0, 4.0, 24.0, 2, raised_by=a)
    assert s.deadline == 34.0
    assert not s.confirm(a)
    assert s.confirm(b) and not s.confirm(b)
    assert s.confirmations == 1 and 10.0 + 4.0 < s.deadline < 34.0
    assert s.confirm(c) and s.deadline == pytest.approx(14.0)
    assert not s.confirm(NodeId("h", 4, 1))  # k reached: no more news


def test_awareness_matches_memberlist_awareness_test():
    a = Awareness(8)
    steps = [(0, 0, 1.0), (-1, 0, 1.0), (-10, 0, 1.0), (1, 1, 2.0), (-1, 0, 1.0), (10, 7, 8.0)]
    steps += [(-1, 6, 7.0), (-1, 5, 6.0), (-1, 4, 5.0), (-1, 3, 4.0), (-1, 2, 3.0)]
    steps += [(-1, 1, 2.0), (-1, 0, 1.0), (-1, 0, 1.0)]
    for delta, score, timeout in steps:
        a.apply(delta)
        assert a.score == score and a.scale(1.0) == timeout


def test_formulas_are_monotone_in_cluster_size():
    lows = [suspicion_timeout(4, n, 1.0) for n in range(1, 2000, 7)]
    assert lows == sorted(lows) and math.isclose(lows[0], 4.0)
