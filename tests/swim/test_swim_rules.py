"""State rules R1-R4 of swim/core.py: precedence, refutation, renewal, identity conflicts."""

from __future__ import annotations

import random

import pytest

from swim import codec
from swim.config import Config
from swim.core import Membership
from swim.events import (
    IdentityRenewed,
    MemberAlive,
    MemberDown,
    MemberRenamed,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
    ProbeTick,
    Send,
)
from swim.member import INCARNATION_MAX, Member, NodeId, State
from swim.testing import Peer, decode, of_type

CFG = Config.lan(eager_gossip_nodes=0)  # these rules are read off the queue; eager rounds would
# send (and retire) an update before the test looks: test_swim_dissemination covers them
ME = ("10.0.0.1", 7000)


def make(gen: int = 100) -> Membership:
    core = Membership(ME, CFG, random.Random(1), gen=gen)
    core.start(0.0)
    return core


def peer(port: int = 8000, gen: int = 1) -> Peer:
    return Peer(NodeId("10.0.0.2", port, gen), CFG)


def feed(core: Membership, src: Peer, *parts: bytes, now: float = 1.0) -> list:
    return core.handle_datagram(src.addr, src.packet(*parts), now)


def state(core: Membership, p: Peer):
    m = core.member(p.addr)
    return None if m is None else (m.id.gen, m.state, m.incarnation)


def queued(core: Membership) -> list:
    return [u.key for u in core.pending_updates()]


def test_alive_introduces_a_member_and_is_regossiped():
    core, b = make(), peer()
    out = feed(core, b, codec.alive(b.id, 0, b"meta"))
    assert of_type(out, MemberUp)[0].member.meta == b"meta"
    assert state(core, b) == (1, State.ALIVE, 0)
    assert ("m", b.addr) in queued(core)
    assert core.num_members() == 2


def test_alive_needs_a_higher_incarnation():
    core, b = make(), peer()
    feed(core, b, codec.alive(b.id, 3, b""))
    assert of_type(feed(core, b, codec.alive(b.id, 3, b"other")), MemberUpdated) == []
    assert of_type(feed(core, b, codec.alive(b.id, 2, b"other")), MemberUpdated) == []
    out = feed(core, b, codec.alive(b.id, 4, b"new"))
    assert of_type(out, MemberUpdated)[0].member.meta == b"new"
    assert state(core, b) == (1, State.ALIVE, 4)


def test_suspect_at_same_incarnation_wins_and_only_a_higher_alive_refutes():
    core, b, c = make(), peer(), peer(8001)
    feed(core, b, codec.alive(b.id, 2, b""))
    out = feed(core, c, codec.suspect(b.id, 2, c.id))
    assert of_type(out, MemberSuspect) and state(core, b) == (1, State.SUSPECT, 2)
    feed(core, b, codec.alive(b.id, 2, b""))
    assert state(core, b) == (1, State.SUSPECT, 2)
    out = feed(core, b, codec.alive(b.id, 3, b""))
    assert of_type(out, MemberAlive) and state(core, b) == (1, State.ALIVE, 3)
    assert core.suspicion_deadline(b.addr) is None


def test_old_suspicions_are_ignored_and_newer_ones_restart():
    core, b, c = make(), peer(), peer(8001)
    feed(core, b, codec.alive(b.id, 5, b""))
    assert of_type(feed(core, c, codec.suspect(b.id, 4, c.id)), MemberSuspect) == []
    feed(core, c, codec.suspect(b.id, 5, c.id), now=1.0)
    first = core.suspicion_deadline(b.addr)
    out = feed(core, c, codec.suspect(b.id, 6, c.id), now=2.0)
    assert of_type(out, MemberSuspect) and state(core, b) == (1, State.SUSPECT, 6)
    assert core.suspicion_deadline(b.addr) == pytest.approx(first + 1.0)


def test_down_is_final_for_an_identity():
    core, b, c = make(), peer(), peer(8001)
    feed(core, b, codec.alive(b.id, 5, b""))
    assert of_type(feed(core, c, codec.down(b.id, 4, c.id)), MemberDown) == []
    out = feed(core, c, codec.down(b.id, 5, c.id), now=2.0)
    assert of_type(out, MemberDown)[0].member.state is State.DOWN
    assert core.members() == [] and core.num_members() == 1
    for part in (
        codec.alive(b.id, 9, b""),
        codec.suspect(b.id, 9, c.id),
        codec.down(b.id, 9, c.id),
    ):
        assert of_type(feed(core, c, part), (MemberUp, MemberAlive, MemberSuspect)) == []
        assert state(core, b) == (1, State.DOWN, 5)


def test_down_from_the_member_itself_means_left():
    core, b = make(), peer()
    feed(core, b, codec.alive(b.id, 1, b""))
    out = feed(core, b, codec.down(b.id, 1, b.id))
    assert of_type(out, MemberDown)[0].member.state is State.LEFT


def test_unknown_members_are_learned_only_from_alive():
    core, b, c = make(), peer(), peer(8001)
    feed(core, c, codec.suspect(b.id, 1, c.id), codec.down(b.id, 1, c.id))
    assert core.member(b.addr) is None


def test_a_newer_identity_takes_the_address():
    core, old = make(), peer(gen=5)
    new, older = peer(gen=6), peer(gen=4)
    feed(core, old, codec.alive(old.id, 7, b""))
    out = feed(core, new, codec.alive(new.id, 0, b"n"))
    (ren,) = of_type(out, MemberRenamed)
    assert ren.old.id == old.id and ren.new.id == new.id and ren.new.incarnation == 0
    out = feed(core, older, codec.alive(older.id, 99, b""))
    assert of_type(out, (MemberUp, MemberRenamed, MemberUpdated)) == []
    assert state(core, new) == (6, State.ALIVE, 0)
    # After the newer one goes down, an even newer identity comes up (not a rename).
    feed(core, new, codec.down(new.id, 0, old.id))
    newest = peer(gen=7)
    assert of_type(feed(core, newest, codec.alive(newest.id, 0, b"")), MemberUp)


def test_stale_or_down_senders_are_ignored_and_told():
    core, b = make(), peer(gen=5)
    feed(core, b, codec.alive(b.id, 1, b""))
    older = peer(gen=4)
    (send,) = of_type(feed(core, older, codec.ping(1, core.identity)), Send)
    assert core.stats.ignored["stale_sender"] == 1
    _, parts = decode(send.data, CFG)
    assert parts[0] == (codec.ALIVE, b.id, 1, b"")  # "your address has a newer identity"
    assert not any(p[0] == codec.ACK for p in parts)
    c = peer(8001)
    feed(core, c, codec.down(b.id, 1, c.id))
    out = feed(core, b, codec.ping(2, core.identity))
    (send,) = of_type(out, Send)
    assert send.addr == b.addr
    _, parts = decode(send.data, CFG)
    assert (codec.DOWN, b.id, 1, core.identity) in parts  # "you are down: renew"
    assert not any(p[0] == codec.ACK for p in parts)


def test_two_members_holding_each_other_down_renew_instead_of_answering_forever():
    # Both sides of a healed partition declared each other down. Each answers a down sender
    # with DOWN; unless the DOWN about itself is read first, the two bounce it for ever
    # (found by the simulator: ~1000 datagrams/s per pair until the next push/pull).
    a = Membership(("10.0.0.1", 7000), CFG, random.Random(1), gen=1)
    b = Membership(("10.0.0.2", 7000), CFG, random.Random(2), gen=1)
    for core in (a, b):
        core.start(0.0)
    a_id, b_id = a.identity, b.identity
    a.handle_datagram(b.addr, Peer(b_id, CFG).packet(codec.alive(b_id, 0, b"")), 0.0)
    b.handle_datagram(a.addr, Peer(a_id, CFG).packet(codec.alive(a_id, 0, b"")), 0.0)
    c = peer(9000)
    a.handle_datagram(c.addr, c.packet(codec.down(b_id, 0, c.id)), 0.0)
    b.handle_datagram(c.addr, c.packet(codec.down(a_id, 0, c.id)), 0.0)
    cores = {a.addr: a, b.addr: b}
    wire = [(a.addr, s) for s in of_type(a.send_message(b.addr, b"hello", 1.0), Send)]
    hops = 0
    while wire and hops < 20:
        src, send = wire.pop(0)
        hops += 1
        dst = cores[send.addr]
        wire += [(dst.addr, s) for s in of_type(dst.handle_datagram(src, send.data, 1.0), Send)]
    assert not wire and hops <= 3
    assert a.identity.gen > a_id.gen and b.identity.gen > b_id.gen  # both renewed


def test_restore_learns_members_without_gossiping_them_and_probes_them():
    core, b, c, d = make(), peer(8000), peer(8001), peer(8002)
    feed(core, d, codec.alive(d.id, 3, b"d"))
    before = queued(core)
    out = core.restore(
        [
            Member(b.id, 4, State.ALIVE, b"b"),
            Member(c.id, 0, State.SUSPECT, b""),  # only ALIVE entries are taken
            Member(d.id, 9, State.ALIVE, b""),  # already known: unchanged
            Member(core.identity, 7, State.ALIVE, b""),  # ourselves: skipped
        ],
        1.0,
    )
    assert [n.member for n in of_type(out, MemberUp)] == [Member(b.id, 4, State.ALIVE, b"b")]
    assert of_type(out, Send) == [] and queued(core) == before
    assert state(core, b) == (1, State.ALIVE, 4) and state(core, c) is None
    assert state(core, d) == (1, State.ALIVE, 3) and core.num_members() == 3
    targets = set()
    for t in range(2, 6):
        for e in core.handle_timer(ProbeTick(core._token), float(t)):
            if isinstance(e, Send) and decode(e.data, CFG)[1][0][0] == codec.PING:
                targets.add(e.addr)
    assert targets == {b.addr, d.addr}


def test_suspicion_about_us_is_refuted_with_a_higher_incarnation():
    core, b = make(), peer()
    feed(core, b, codec.suspect(core.identity, 0, b.id))
    assert core.incarnation == 1 and core.awareness.score == 1
    feed(core, b, codec.suspect(core.identity, 7, b.id))
    assert core.incarnation == 8 and core.stats.refutations == 2
    feed(core, b, codec.suspect(core.identity, 3, b.id))  # old news
    assert core.incarnation == 8
    assert ("m", ME) in queued(core)
    _, parts = decode(of_type(core.send_message(b.addr, b"x", 2.0), Send)[0].data, CFG)
    assert (codec.ALIVE, core.identity, 8, b"") in parts


def test_alive_about_us_with_a_higher_incarnation_or_other_meta_is_refuted():
    core, b = make(), peer()
    feed(core, b, codec.alive(core.identity, 4, b""))
    assert core.incarnation == 5
    feed(core, b, codec.alive(core.identity, 5, b"forged"))
    assert core.incarnation == 6
    feed(core, b, codec.alive(core.identity, 6, b""))  # exactly what we say: nothing to do
    assert core.incarnation == 6


def test_declared_down_we_renew_our_identity():
    core, b = make(gen=100), peer()
    core.handle_datagram(b.addr, b.packet(codec.suspect(core.identity, 0, b.id)), 1.0)
    out = feed(core, b, codec.down(core.identity, 0, b.id))
    (ren,) = of_type(out, IdentityRenewed)
    assert ren.old.gen == 100 and ren.new.gen == 101 == core.identity.gen
    assert core.incarnation == 0 and core.stats.renewals == 1
    # Down about an older identity of ours changes nothing; a newer one is jumped over.
    feed(core, b, codec.down(NodeId(*ME, 50), 3, b.id))
    assert core.identity.gen == 101
    feed(core, b, codec.down(NodeId(*ME, 500), 0, b.id))
    assert core.identity.gen == 501


def test_news_of_a_newer_identity_at_our_address_makes_us_renew_above_it():
    # We restarted with a smaller generation than our previous life had.
    for part in (
        lambda b: codec.alive(NodeId(*ME, 150), 4, b""),
        lambda b: codec.suspect(NodeId(*ME, 150), 4, b.id),
    ):
        core, b = make(gen=100), peer()
        out = feed(core, b, part(b))
        assert of_type(out, IdentityRenewed)[0].new.gen == 151 == core.identity.gen


def test_renewal_when_the_incarnation_would_overflow():
    core, b = make(gen=3), peer()
    feed(core, b, codec.suspect(core.identity, INCARNATION_MAX, b.id))
    assert core.identity.gen == 4 and core.incarnation == 0


def test_a_ping_for_an_older_identity_of_ours_gets_our_current_one():
    core, b = make(gen=9), peer()
    out = feed(core, b, codec.ping(5, NodeId(*ME, 8)))
    (send,) = of_type(out, Send)
    _, parts = decode(send.data, CFG)
    assert (codec.ALIVE, core.identity, 0, b"") in parts
    assert not any(p[0] == codec.ACK for p in parts)
    assert of_type(feed(core, b, codec.ping(5, NodeId(*ME, 10))), Send) == []  # newer: ignored
    assert core.stats.ignored["not_for_us"] == 2


def test_a_leaving_member_neither_refutes_nor_renews():
    core, b = make(), peer()
    feed(core, b, codec.alive(b.id, 0, b""))
    core.leave(1.0)
    feed(core, b, codec.suspect(core.identity, 0, b.id), codec.down(core.identity, 0, b.id))
    assert core.incarnation == 0 and core.identity.gen == 100
    with pytest.raises(RuntimeError):
        core.join([b.addr], 2.0)


def test_lifecycle_misuse_is_an_error():
    core = Membership(ME, CFG, random.Random(1))
    with pytest.raises(RuntimeError, match="start"):
        core.join([("10.0.0.2", 1)], 0.0)
    core.start(0.0)
    with pytest.raises(RuntimeError, match="already"):
        core.start(0.0)


def test_rejoin_after_leave_uses_a_renewed_identity():
    core = make(gen=10)
    core.leave(1.0)
    out = core.start(2.0)
    assert core.identity.gen == 11 and of_type(out, IdentityRenewed)
    assert not core.leaving
