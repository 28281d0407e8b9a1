"""Every checker fails when its invariant is broken: each test injects one fault into a real
world (a forged notification or datagram, or a patched core) and expects that checker's
violation - and none on an honest run."""

from __future__ import annotations

import pytest

from simulations import SimulationFailure, run_liveness, swim_world
from simulations.swim_checkers import (
    AwarenessRange,
    DetectionBound,
    FalsePositives,
    MessageLoad,
    PacketSize,
    Precedence,
    RetransmitLimit,
    ViewsConverge,
    detection_cycle,
    transition_error,
)
from swim import Config, Member, State, codec
from swim.core import Membership
from swim.events import MemberAlive, MemberDown, MemberSuspect
from swim.testing import Peer

A, S, D, L = State.ALIVE, State.SUSPECT, State.DOWN, State.LEFT


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        ((1, 0, A), (1, 0, S), True),
        ((1, 0, S), (1, 1, A), True),
        ((1, 0, S), (1, 0, A), False),  # refuting needs a higher incarnation
        ((1, 3, A), (1, 2, A), False),
        ((1, 3, S), (1, 2, S), False),
        ((1, 3, A), (1, 3, D), True),
        ((1, 3, D), (1, 4, A), False),  # down is final for an identity
        ((1, 3, L), (1, 3, D), False),
        ((2, 0, A), (1, 9, A), False),  # generations never go back
        ((1, 9, D), (2, 0, A), True),  # a new identity replaces the old
        ((1, 2, S), (1, 3, S), True),
    ],
)
def test_precedence_table(old, new, ok):
    assert (transition_error(old, new) is None) is ok


def small(checker, n: int = 4, seed: int = 5, **kw):
    w = swim_world(seed, n, checkers=[checker], **kw)
    w.run_until(5.0)
    return w


def names(exc: SimulationFailure) -> set[str]:
    return {v.checker for v in exc.violations}


def expect(world, name: str) -> SimulationFailure:
    with pytest.raises(SimulationFailure) as info:
        world.check(final=True)
    assert names(info.value) == {name}, str(info.value)
    msg = str(info.value)
    assert f"seed {world.seed}" in msg and "last trace records" in msg
    return info.value


def test_an_honest_run_passes_every_checker():
    from simulations import swim_checkers

    w = swim_world(3, 6, checkers=swim_checkers())
    w.run_until(40.0)
    w.crash(w.nodes[2])
    w.run_until(80.0)
    run_liveness(w)
    w.check()


def test_packet_size_catches_an_oversized_datagram():
    w = small(PacketSize())
    a, b = w.nodes[:2]
    a.cores["swim"].port.send(b.addr, b"\x01\x00" + bytes(1500))
    expect(w, "swim-packet-size")


def test_retransmit_limit_catches_an_update_sent_too_often():
    w = small(RetransmitLimit())
    a, b = w.nodes[:2]
    core = a.cores["swim"]
    peer = Peer(core.identity, core.config)
    update = codec.alive(core.identity, 77, b"")
    limit = core.config.retransmit_limit(len(w.nodes))
    for _ in range(limit):  # as many piggybacked sends as allowed: fine
        core.port.send(b.addr, peer.packet(update), "gossip")
    w.check(final=False)
    core.port.send(b.addr, peer.packet(codec.ack(1), update), "datagram")  # own part + update
    expect(w, "swim-retransmit-limit")


def test_precedence_catches_a_refutation_without_a_higher_incarnation():
    w = small(Precedence())
    a, b = w.nodes[:2]
    nid = b.cores["swim"].identity
    port = a.cores["swim"].port
    port.publish(MemberSuspect(Member(nid, 0, State.SUSPECT)))
    w.check(final=False)
    port.publish(MemberAlive(Member(nid, 0, State.ALIVE)))
    expect(w, "swim-precedence")


def test_precedence_catches_an_incarnation_the_member_never_had():
    w = small(Precedence())
    a, b = w.nodes[:2]
    nid = b.cores["swim"].identity
    a.cores["swim"].port.publish(MemberAlive(Member(nid, 40, State.ALIVE)))
    expect(w, "swim-precedence")


def test_precedence_audits_catch_a_silent_decrease(monkeypatch):
    w = small(Precedence(audit_every=1.0))
    a, b = w.nodes[:2]
    rec = a.cores["swim"].membership._members[b.addr]
    b.cores["swim"].membership._inc = 5
    rec.incarnation = 5
    w.run_for(2.0)
    w.check(final=False)
    rec.incarnation = 4  # a bug that lowers an incarnation without telling anyone
    w.run_for(3.0)
    expect(w, "swim-precedence")


def test_awareness_checker_catches_a_score_out_of_range(monkeypatch):
    from swim.lifeguard import Awareness

    def isolate_n1():
        # Long suspicions keep n1 probing (and failing) for the whole minute.
        w = small(AwarenessRange(), config=Config.lan(suspicion_mult=20))
        w.partition([[w.nodes[1]], w.nodes[2:]])  # n1's probes all fail: its score saturates
        w.run_for(60.0)
        return w

    w = isolate_n1()
    w.check()
    assert w.checkers[0].highest == 7

    def no_ceiling(self, delta):  # the bug: saturate at zero only
        self.score = max(0, self.score + delta)

    monkeypatch.setattr(Awareness, "apply", no_ceiling)
    expect(isolate_n1(), "swim-awareness")


def test_false_positive_checker_only_fires_in_a_clean_run():
    w = small(FalsePositives())
    a, b = w.nodes[:2]
    down = MemberDown(Member(b.cores["swim"].identity, 0, State.DOWN))
    a.cores["swim"].port.publish(down)
    expect(w, "swim-false-positives")

    w2 = small(FalsePositives())
    w2.clog(w2.nodes[3], w2.net.default.delay)  # any stall makes false positives possible
    w2.nodes[0].cores["swim"].port.publish(down)
    w2.check()
    assert w2.checkers[0].downs and w2.checkers[0].victims == 1


def test_detection_bound_catches_a_member_that_never_declares_down(monkeypatch):
    checker = DetectionBound()
    w = small(checker)
    deaf = w.nodes[1].cores["swim"].membership
    original = Membership._on_suspicion_timeout

    def maybe_ignore(self, *args):
        if self is not deaf:
            original(self, *args)

    monkeypatch.setattr(Membership, "_on_suspicion_timeout", maybe_ignore)
    # The deaf member learns the verdict from others unless it is alone with the victim.
    w.partition([[w.nodes[1], w.nodes[2]], [w.nodes[0], w.nodes[3]]])
    w.run_for(1.0)
    w.crash(w.nodes[2])
    cycle = detection_cycle(deaf.config, len(w.nodes), w.net.max_delay)
    w.run_for(cycle + 5.0)
    failure = expect(w, "swim-detection-bound")
    assert "n1 still holds crashed" in str(failure)
    assert checker.detected >= 2  # the healthy side did detect it


def test_message_load_catches_a_reply_loop():
    w = small(MessageLoad())
    w.run_for(30.0)
    w.check()  # ordinary traffic stays far below the bound
    a, b = w.nodes[:2]
    port = a.cores["swim"].port
    bound = w.checkers[0].bound(a.cores["swim"].config)
    assert w.checkers[0].busiest * w.checkers[0].window < bound / 10
    for _ in range(bound + 1):
        port.send(b.addr, b"\x01\x00")
    expect(w, "swim-message-load")


def test_views_converge_catches_a_member_that_ignores_newcomers(monkeypatch):
    w = swim_world(2, 4, checkers=[ViewsConverge()], config=Config.lan(push_pull_interval=5.0))
    w.run_until(3.0)
    run_liveness(w, timeout=5.0)
    w.check()
    blind = w.nodes[0].cores["swim"].membership
    original = Membership._on_alive

    def ignore_new(self, nid, *args):
        if self is blind and nid.addr not in self._members:
            return
        original(self, nid, *args)

    monkeypatch.setattr(Membership, "_on_alive", ignore_new)
    from simulations.cluster import add_swim_node

    add_swim_node(w, Config.lan(push_pull_interval=5.0))
    run_liveness(w, timeout=30.0)
    failure = expect(w, "swim-views-converge")
    assert "n0 sees" in str(failure)
