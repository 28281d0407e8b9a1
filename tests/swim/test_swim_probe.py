"""Probing and Lifeguard (R5-R7): ping, ping-req, ack relay, nack, awareness, suspicion timer."""

from __future__ import annotations

import random

import pytest

from swim import codec
from swim.config import Config
from swim.core import NACK_FRACTION, Membership
from swim.events import (
    GossipTick,
    IndirectProbe,
    MemberDown,
    MemberSuspect,
    NackDue,
    ProbeTick,
    Send,
    SetTimer,
    SuspicionTimeout,
)
from swim.member import NodeId, State
from swim.testing import Peer, decode, of_type

CFG = Config.lan()
ME = ("10.0.0.1", 7000)


def cluster(npeers: int = 4, seed: int = 1) -> tuple[Membership, list[Peer]]:
    core = Membership(ME, CFG, random.Random(seed), gen=100)
    core.start(0.0)
    peers = [Peer(NodeId("10.0.0.2", 8000 + i, 1), CFG) for i in range(npeers)]
    for p in peers:
        core.handle_datagram(p.addr, p.packet(codec.alive(p.id, 0, b"")), 0.0)
    return core, peers


def parts_to(out: list, addr) -> list[list[tuple]]:
    return [decode(s.data, CFG)[1] for s in of_type(out, Send) if s.addr == addr]


def all_parts(out: list) -> list[tuple[tuple, tuple]]:
    return [(s.addr, p) for s in of_type(out, Send) for p in decode(s.data, CFG)[1]]


def timer(out: list, kind: type) -> SetTimer:
    (t,) = [e for e in out if isinstance(e, SetTimer) and isinstance(e.timer, kind)]
    return t


def tick(core: Membership, now: float) -> tuple[list, Peer | None, int | None]:
    """Fire a probe tick; return effects, the pinged address and the ping's seq."""
    out = core.handle_timer(ProbeTick(1), now)
    pings = [(a, p) for a, p in all_parts(out) if p[0] == codec.PING]
    if not pings:
        return out, None, None
    (addr, p) = pings[0]
    return out, addr, p[1]


def test_a_probe_pings_one_target_and_schedules_the_indirect_step():
    core, peers = cluster()
    out, target, _seq = tick(core, 10.0)
    assert target in [p.addr for p in peers]
    assert timer(out, IndirectProbe).at == pytest.approx(10.0 + CFG.probe_timeout)
    assert timer(out, ProbeTick).at == pytest.approx(11.0)
    assert core.stats.probes == 1


def test_an_acked_probe_leaves_the_target_alone():
    core, peers = cluster()
    by_addr = {p.addr: p for p in peers}
    _out, target, seq = tick(core, 10.0)
    core.handle_datagram(target, by_addr[target].packet(codec.ack(seq)), 10.01)
    assert core.handle_timer(IndirectProbe(1, seq), 10.5) == []
    tick(core, 11.0)
    assert core.member(target).state is State.ALIVE and core.awareness.score == 0


def test_round_robin_probes_every_member_once_per_pass():
    core, peers = cluster(6)
    by_addr = {p.addr: p for p in peers}
    now, seen = 10.0, []
    for _ in range(12):
        _out, target, seq = tick(core, now)
        seen.append(target)
        core.handle_datagram(target, by_addr[target].packet(codec.ack(seq)), now + 0.01)
        now += 1.0
    addrs = sorted(by_addr)
    assert sorted(seen[:6]) == addrs and sorted(seen[6:]) == addrs


def test_a_new_member_is_probed_within_two_passes():
    core, peers = cluster(5)
    by_addr = {p.addr: p for p in peers}
    now = 10.0
    _, target, seq = tick(core, now)
    core.handle_datagram(target, by_addr[target].packet(codec.ack(seq)), now)
    late = Peer(NodeId("10.0.0.3", 9000, 1), CFG)
    by_addr[late.addr] = late
    core.handle_datagram(late.addr, late.packet(codec.alive(late.id, 0, b"")), now)
    seen = []
    for _ in range(2 * 6 - 1):  # SWIM section 4.3: at most 2n - 1 periods apart
        now += 1.0
        _out, target, seq = tick(core, now)
        seen.append(target)
        core.handle_datagram(target, by_addr[target].packet(codec.ack(seq)), now)
    assert late.addr in seen


def test_no_ack_asks_helpers_and_a_relayed_ack_saves_the_target():
    core, peers = cluster()
    out, target, seq = tick(core, 10.0)
    out = core.handle_timer(IndirectProbe(1, seq), 10.5)
    reqs = [(a, p) for a, p in all_parts(out) if p[0] == codec.PING_REQ]
    assert len(reqs) == CFG.indirect_checks
    assert all(a != target and p[1] == seq and p[2].addr == target and p[3] for a, p in reqs)
    helper = next(p for p in peers if p.addr == reqs[0][0])
    core.handle_datagram(helper.addr, helper.packet(codec.ack(seq)), 10.7)
    tick(core, 11.0)
    assert core.member(target).state is State.ALIVE and core.awareness.score == 0


def test_unanswered_probe_suspects_and_missing_nacks_raise_awareness():
    core, peers = cluster()
    out, target, seq = tick(core, 10.0)
    out = core.handle_timer(IndirectProbe(1, seq), 10.5)
    helpers = [a for a, p in all_parts(out) if p[0] == codec.PING_REQ]
    by_addr = {p.addr: p for p in peers}
    for a in helpers[:2]:  # two of three helpers nack: they are fine, the target is not
        core.handle_datagram(a, by_addr[a].packet(codec.nack(seq)), 10.9)
    out, _, _ = tick(core, 11.0)
    assert of_type(out, MemberSuspect)[0].member.addr == target
    assert core.awareness.score == 1  # 3 expected - 2 received
    assert timer(out, ProbeTick).at == pytest.approx(11.0 + 2 * CFG.probe_interval)


def test_a_probe_concludes_once_every_helper_has_nacked():
    core, peers = cluster()
    _out, target, seq = tick(core, 10.0)
    out = core.handle_timer(IndirectProbe(1, seq), 10.5)
    helpers = [a for a, p in all_parts(out) if p[0] == codec.PING_REQ]
    assert len(helpers) == 3
    by_addr = {p.addr: p for p in peers}
    for a in helpers[:2]:
        out = core.handle_datagram(a, by_addr[a].packet(codec.nack(seq)), 10.9)
        assert of_type(out, MemberSuspect) == []  # one helper may still relay an ack
    out = core.handle_datagram(helpers[2], by_addr[helpers[2]].packet(codec.nack(seq)), 10.9)
    assert of_type(out, MemberSuspect)[0].member.addr == target  # before the period ends
    assert core.awareness.score == 0  # every helper answered: our own health is fine
    out, _, _ = tick(core, 11.0)  # the period's tick just probes the next member
    assert of_type(out, MemberSuspect) == [] and core.stats.probes_failed == 1


def test_without_helpers_a_failed_probe_costs_one_point():
    core, _ = cluster(1)
    _, target, seq = tick(core, 10.0)
    out = core.handle_timer(IndirectProbe(1, seq), 10.5)
    assert [p for _, p in all_parts(out) if p[0] == codec.PING_REQ] == []
    tick(core, 11.0)
    assert core.awareness.score == 1
    assert core.member(target).state is State.SUSPECT


def test_buddy_system_probing_a_suspect_carries_the_suspicion():
    core, peers = cluster(1)
    b = peers[0]
    core.handle_datagram(b.addr, b.packet(codec.suspect(b.id, 0, NodeId("x", 1, 1))), 5.0)
    _, _target, _seq = tick(core, 10.0)
    out = core.handle_timer(ProbeTick(1), 12.0)  # conclude (unacked) and probe again
    (parts,) = parts_to(out, b.addr)
    assert parts[0][0] == codec.PING
    assert (codec.SUSPECT, b.id, 0, core.identity) in parts


def test_as_helper_we_relay_the_ack_or_send_a_nack():
    core, peers = cluster()
    req, target = peers[0], peers[1]
    out = core.handle_datagram(req.addr, req.packet(codec.ping_req(77, target.id, True)), 20.0)
    ((ping,),) = [[p for p in ps if p[0] == codec.PING] for ps in parts_to(out, target.addr)]
    local = ping[1]
    nack_at = timer(out, NackDue)
    assert nack_at.at == pytest.approx(20.0 + NACK_FRACTION * CFG.probe_timeout)
    # The target answers: the ack goes back to the requester under its own seq.
    out = core.handle_datagram(target.addr, target.packet(codec.ack(local)), 20.1)
    assert any(p == (codec.ACK, 77) for p in parts_to(out, req.addr)[0])
    assert not any(p[0] == codec.NACK for _, p in all_parts(core.handle_timer(nack_at.timer, 20.4)))
    # A second request gets no answer from the target: a nack when due.
    out = core.handle_datagram(req.addr, req.packet(codec.ping_req(78, target.id, True)), 30.0)
    out = core.handle_timer(timer(out, NackDue).timer, 30.4)
    assert any(p == (codec.NACK, 78) for p in parts_to(out, req.addr)[0])
    # Without want_nack, silence.
    out = core.handle_datagram(req.addr, req.packet(codec.ping_req(79, target.id, False)), 40.0)
    out = core.handle_timer(timer(out, NackDue).timer, 40.4)
    assert not any(p[0] == codec.NACK for _, p in all_parts(out))


def test_suspicion_times_out_to_down_unless_refuted():
    core, peers = cluster()
    b, c = peers[0], peers[1]
    out = core.handle_datagram(c.addr, c.packet(codec.suspect(b.id, 0, c.id)), 10.0)
    st = timer(out, SuspicionTimeout)
    _low, high, k = CFG.suspicion_bounds(5)
    assert k == 2 and st.at == pytest.approx(10.0 + high)
    assert core.handle_timer(st.timer, st.at - 1.0) == []  # not yet due: stale
    out = core.handle_timer(st.timer, st.at)
    assert of_type(out, MemberDown)[0].member.state is State.DOWN
    assert core.stats.declared_down == 1
    gossip = core.send_message(c.addr, b"", st.at)
    assert (codec.DOWN, b.id, 0, core.identity) in parts_to(gossip, c.addr)[0]
    # A refuted suspicion's timer does nothing.
    out = core.handle_datagram(c.addr, c.packet(codec.suspect(c.id, 0, peers[2].id)), 20.0)
    stale = timer(out, SuspicionTimeout)
    core.handle_datagram(c.addr, c.packet(codec.alive(c.id, 1, b"")), 21.0)
    assert core.handle_timer(stale.timer, stale.at) == []
    assert core.member(c.addr).state is State.ALIVE


def test_independent_confirmations_shrink_the_timeout_to_min():
    core, peers = cluster()
    b, c, d, e = peers
    low, high, _ = CFG.suspicion_bounds(5)
    core.handle_datagram(c.addr, c.packet(codec.suspect(b.id, 0, c.id)), 10.0)
    out = core.handle_datagram(c.addr, c.packet(codec.suspect(b.id, 0, c.id)), 11.0)
    assert of_type(out, SetTimer) == []  # the raiser again: not a confirmation
    out = core.handle_datagram(d.addr, d.packet(codec.suspect(b.id, 0, d.id)), 11.0)
    one = timer(out, SuspicionTimeout).at
    assert 10.0 + low < one < 10.0 + high and core.suspicion_confirmations(b.addr) == 1
    out = core.handle_datagram(e.addr, e.packet(codec.suspect(b.id, 0, e.id)), 12.0)
    assert timer(out, SuspicionTimeout).at == pytest.approx(10.0 + low)
    # The old, later timer is stale by the time it fires: the member is already down.
    core.handle_timer(SuspicionTimeout(1, b.id, 0), 10.0 + low)
    assert core.member(b.addr).state is State.DOWN
    assert core.handle_timer(SuspicionTimeout(1, b.id, 0), one) == []


def test_timers_with_a_stale_token_are_ignored():
    core, _ = cluster()
    assert core.handle_timer(ProbeTick(999), 5.0) == []
    assert core.handle_timer(GossipTick(0), 5.0) == []
    assert core.stats.ignored["stale_timer"] == 2


def test_leaving_ends_the_probe_chain():
    core, _ = cluster()
    core.leave(5.0)
    assert core.handle_timer(ProbeTick(1), 6.0) == []


def test_an_ack_for_an_old_probe_is_harmless():
    core, peers = cluster()
    by_addr = {p.addr: p for p in peers}
    _, t1, s1 = tick(core, 10.0)
    _, t2, s2 = tick(core, 11.0)  # t1 unanswered: suspect
    core.handle_datagram(t1, by_addr[t1].packet(codec.ack(s1)), 11.5)
    assert core.member(t1).state is State.SUSPECT
    core.handle_datagram(t2, by_addr[t2].packet(codec.ack(s2)), 11.5)
    tick(core, 12.0)
    assert core.member(t2).state is State.ALIVE


def test_a_member_back_under_a_new_identity_is_probed_within_the_pass():
    core, peers = cluster(6)
    by_addr = {p.addr: p for p in peers}
    now, first = 10.0, []
    for _ in range(3):  # half-way through a pass of 6
        _, target, seq = tick(core, now)
        first.append(target)
        core.handle_datagram(target, by_addr[target].packet(codec.ack(seq)), now)
        now += 1.0
    b = by_addr[first[0]]  # already probed in this pass
    core.handle_datagram(peers[1].addr, peers[1].packet(codec.down(b.id, 0, peers[1].id)), now)
    back = Peer(NodeId(b.addr[0], b.addr[1], 2), CFG)
    by_addr[b.addr] = back
    core.handle_datagram(back.addr, back.packet(codec.alive(back.id, 0, b"")), now)
    rest = []
    for _ in range(3 + 1):  # the rest of the pass, plus the returning member
        _, target, seq = tick(core, now)
        rest.append(target)
        core.handle_datagram(target, by_addr[target].packet(codec.ack(seq)), now)
        now += 1.0
    assert b.addr in rest


def test_random_members_are_uniform_and_respect_the_predicate_in_large_clusters():
    # Gossip and helpers are drawn by rejection sampling when most members qualify, by a scan
    # when few do; both must pick uniformly among the qualifying members, never twice.
    core, peers = cluster(100)
    for p in peers[:20]:
        core.handle_datagram(p.addr, p.packet(codec.down(p.id, 0, p.id)), 1.0)  # left
    counts = {p.addr: 0 for p in peers}
    for _ in range(4000):
        picks = core._random_members(3, lambda r: r.state is State.ALIVE)
        assert len({r.id.addr for r in picks}) == 3
        for r in picks:
            counts[r.id.addr] += 1
    assert all(counts[p.addr] == 0 for p in peers[:20])
    alive = [counts[p.addr] for p in peers[20:]]
    assert min(alive) > 0.7 * 150 and max(alive) < 1.3 * 150  # 4000 * 3 / 80 = 150 each
    few = core._random_members(5, lambda r: r.state is State.LEFT)  # 20 of 100: scan path
    assert len({r.id for r in few}) == 5 and all(r.state is State.LEFT for r in few)
    assert core._random_members(5, lambda r: False) == []
