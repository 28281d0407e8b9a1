"""Whole clusters on the in-memory network: join, failure detection, renewal, leave, partitions.

Virtual time, so these assert protocol bounds (in protocol seconds), never wall-clock timings.
"""

from __future__ import annotations

import statistics

import pytest

from swim.config import Config
from swim.events import (
    IdentityRenewed,
    MemberDown,
    MemberRenamed,
    MemberSuspect,
    MemberUp,
)
from swim.keyring import Keyring
from swim.member import State
from swim.testing import LocalNetwork

LAN = Config.lan()


def start(n: int, seed: int = 1, config: Config = LAN, **kw) -> tuple[LocalNetwork, list]:
    net = LocalNetwork(seed=seed, config=config, **kw)
    first = net.add()
    nodes = [first] + [net.add(seeds=[first.addr]) for _ in range(n - 1)]
    return net, nodes


def notes(net: LocalNetwork, kind: type, about=None, since: float = 0.0) -> list:
    return [
        (t, a, n)
        for t, a, n in net.notifications
        if isinstance(n, kind)
        and t >= since
        and (about is None or (getattr(n, "member", None) is not None and n.member.addr == about))
    ]


def everyone_sees(net: LocalNetwork, addr, states: tuple[State, ...]) -> bool:
    return all(
        (m := core.member(addr)) is not None and m.state in states
        for a, core in net.nodes.items()
        if a != addr
    )


def test_twenty_members_converge_right_after_joining_through_one_seed():
    net, _nodes = start(20)
    assert net.run_until_true(net.converged, timeout=1.0, step=0.01)
    assert net.now <= 0.1  # the join exchange plus one announce hop, not gossip rounds
    net.run_for(60.0)
    assert net.converged()
    assert notes(net, MemberSuspect) == []  # no loss, no stalls: no false suspicion


def test_a_crashed_member_is_declared_down_by_all_within_the_lifeguard_bound():
    net, nodes = start(20, seed=4)
    net.run_for(10.0)
    victim = nodes[7].addr
    net.crash(victim)
    t0 = net.now
    assert net.run_until_true(lambda: everyone_sees(net, victim, (State.DOWN,)), timeout=60)
    downs = [t - t0 for t, _, _ in notes(net, MemberDown, about=victim)]
    assert len(downs) == 19
    low, high, _ = LAN.suspicion_bounds(20)
    # First probe within ~2 periods, then Min once K members confirm; never beyond Max.
    assert max(downs) <= 3 * LAN.probe_interval + high
    assert statistics.median(downs) <= 3 * LAN.probe_interval + low + 1.0
    # Nobody else was touched.
    assert [n for n in notes(net, MemberSuspect) if n[2].member.addr != victim] == []
    assert [n for n in notes(net, MemberDown) if n[2].member.addr != victim] == []


@pytest.mark.parametrize("newer", [True, False])
def test_a_restarted_member_rejoins_under_a_renewed_identity(newer):
    net, nodes = start(8, seed=5)
    net.run_for(5.0)
    victim = nodes[3]
    net.crash(victim.addr)
    assert net.run_until_true(lambda: everyone_sees(net, victim.addr, (State.DOWN,)), 60)
    old = victim.identity
    # Restart at the same address; its fresh generation may be newer or older than the old one.
    gen = old.gen + 10 if newer else old.gen - 10
    back = net.add(victim.addr[1], seeds=[nodes[0].addr], gen=gen)
    assert net.run_until_true(net.converged, timeout=10)
    assert back.identity.gen > old.gen
    if not newer:  # it learned its address was held by a newer, dead identity and jumped it
        assert any(
            isinstance(n, IdentityRenewed) for _, a, n in net.notifications if a == back.addr
        )
    for core in net.nodes.values():
        if core is not back:
            assert core.member(back.addr).id == back.identity


def test_a_quick_restart_with_an_older_generation_still_converges():
    net, nodes = start(6, seed=6)
    net.run_for(5.0)
    victim = nodes[2]
    net.crash(victim.addr)
    back = net.add(victim.addr[1], seeds=[nodes[0].addr], gen=victim.identity.gen - 1)
    # Others hold the old (newer-gen) identity alive; it is probed out and declared down, then
    # the restarted member renews above it.
    assert net.run_until_true(net.converged, timeout=120)
    assert back.identity.gen > victim.identity.gen


def test_a_newer_restart_renames_the_member_before_detection():
    net, nodes = start(6, seed=7)
    net.run_for(5.0)
    victim = nodes[2]
    net.crash(victim.addr)
    back = net.add(victim.addr[1], seeds=[nodes[0].addr], gen=victim.identity.gen + 1)
    assert net.run_until_true(net.converged, timeout=5)
    renamed = [n for _, _, n in net.notifications if isinstance(n, MemberRenamed)]
    assert len(renamed) == 5 and {r.new.id for r in renamed} == {back.identity}
    assert notes(net, MemberDown) == []


def test_leave_is_seen_as_left_without_suspicion():
    net, nodes = start(10, seed=8)
    net.run_for(5.0)
    leaver = nodes[4]
    net.apply(leaver, leaver.leave(net.now))
    assert net.run_until_true(lambda: leaver.leave_done, timeout=5)
    net.crash(leaver.addr)
    assert net.run_until_true(lambda: everyone_sees(net, leaver.addr, (State.LEFT,)), 5)
    assert notes(net, MemberSuspect) == []


def test_a_briefly_unreachable_member_refutes_and_stays():
    net, nodes = start(10, seed=9)
    net.run_for(5.0)
    victim = nodes[5].addr
    for a in list(net.nodes):
        if a != victim:
            net.blocked[(a, victim)] = None
    net.run_until_true(lambda: bool(notes(net, MemberSuspect, about=victim)), timeout=20)
    assert notes(net, MemberSuspect, about=victim)
    net.blocked.clear()  # well before Min: the suspicion reaches it and it refutes
    net.run_for(30.0)
    assert notes(net, MemberDown) == []
    assert nodes[5].incarnation >= 1 and net.converged()


def test_a_healed_partition_merges_back_through_renewal():
    config = Config.lan(push_pull_interval=5.0)
    net, nodes = start(8, seed=10, config=config)
    net.run_for(5.0)
    left, right = [n.addr for n in nodes[:4]], [n.addr for n in nodes[4:]]
    for a in left:
        for b in right:
            net.blocked[(a, b)] = None
            net.blocked[(b, a)] = None
    assert net.run_until_true(
        lambda: (
            all(nodes[0].member(b).state is State.DOWN for b in right)
            and all(nodes[4].member(a).state is State.DOWN for a in left)
        ),
        timeout=120,
    )
    net.run_for(60.0)  # long past gossip-to-the-dead: only the down-member exchange can help
    net.blocked.clear()
    assert net.run_until_true(net.converged, timeout=300)
    assert sum(isinstance(n, IdentityRenewed) for _, _, n in net.notifications) >= 1


def test_same_seed_same_trace_byte_for_byte():
    def trace(seed: int) -> list:
        counter = iter(range(10**9))
        ring = Keyring([b"k" * 32], nonce_source=lambda n: next(counter).to_bytes(n, "big"))
        net = LocalNetwork(seed=seed, config=Config.local(), jitter=0.01, loss=0.05)
        net.record_sent = True
        first = net.add(keyring=ring)
        nodes = [first] + [net.add(seeds=[first.addr], keyring=ring) for _ in range(5)]
        net.run_for(5.0)
        net.crash(nodes[2].addr)
        net.run_for(20.0)
        return net.sent + [(t, a, repr(n)) for t, a, n in net.notifications]

    one = trace(11)
    assert len(one) > 100
    assert one == trace(11)
    assert one != trace(12)


def test_join_reports_up_for_every_member_once():
    net, nodes = start(12, seed=12)
    net.run_for(10.0)
    for core in nodes:
        ups = [
            n.member.addr
            for _, a, n in net.notifications
            if a == core.addr and isinstance(n, MemberUp)
        ]
        assert sorted(ups) == sorted(n.addr for n in nodes if n is not core)
