"""Edges of swim/core.py the rule tests leave open (found by the mutation score, bench/).

What a peer or the runtime can observe: which reason a dropped or ignored input is counted
under, that the counters the runtime exports as metrics move with the events they name, that an
update is never sent back to the member it came from, that every timer the core sets is honoured
when it fires, and the exact limits (packet, stream, port, meta sizes).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import pytest

from swim import codec
from swim.config import Config, ConfigError
from swim.core import SEEN_BROADCASTS_MAX, Membership, PayloadTooLarge
from swim.events import (
    BroadcastReceived,
    GossipTick,
    IdentityRenewed,
    IndirectProbe,
    MemberAlive,
    MemberDown,
    MemberSuspect,
    MemberUp,
    MessageReceived,
    OpenStream,
    ProbeTick,
    PushPullTick,
    ReapDown,
    Send,
    SetTimer,
    StreamDone,
    StreamReply,
    SuspicionTimeout,
)
from swim.keyring import Keyring
from swim.member import INCARNATION_MAX, Member, NodeId, State
from swim.testing import Peer, decode, of_type

CFG = Config.lan(eager_gossip_nodes=0)  # nothing leaves before the test looks, unless it asks
ME = ("10.0.0.1", 7000)
UPDATES = (codec.ALIVE, codec.SUSPECT, codec.DOWN, codec.USER)


def make(npeers: int = 0, config: Config = CFG, *, seed: int = 1, gen: int = 100, keyring=None):
    core = Membership(ME, config, random.Random(seed), gen=gen, keyring=keyring)
    core.start(0.0)
    peers = [Peer(NodeId("10.0.0.2", 8000 + i, 1), config, keyring) for i in range(npeers)]
    for p in peers:
        core.handle_datagram(p.addr, p.packet(codec.alive(p.id, 0, b"")), 0.0)
    return core, peers


def feed(core: Membership, src: Peer, *parts: bytes, now: float = 1.0) -> list:
    return core.handle_datagram(src.addr, src.packet(*parts), now)


def parts_to(out: list, addr, config: Config = CFG) -> list[tuple]:
    return [p for s in of_type(out, Send) if s.addr == addr for p in decode(s.data, config)[1]]


def told(core: Membership, addr, now: float = 2.0) -> list[tuple]:
    """The updates the next packet to ``addr`` carries."""
    return [p for p in parts_to(core.send_message(addr, b"", now), addr) if p[0] in UPDATES]


def drain(core: Membership, now: float) -> float:
    while core.pending_updates():
        core.handle_timer(GossipTick(core._token), now)
        now += 0.25
    return now


def tick(core: Membership, now: float, by_addr: dict | None = None):
    """A probe tick; the pinged address (acked at once when ``by_addr`` is given)."""
    out = core.handle_timer(ProbeTick(core._token), now)
    pings = [(s.addr, p) for s in of_type(out, Send) for p in decode(s.data, CFG)[1]]
    pings = [(a, p[1]) for a, p in pings if p[0] == codec.PING]
    if not pings:
        return None, None
    addr, seq = pings[0]
    if by_addr is not None:
        core.handle_datagram(addr, by_addr[addr].packet(codec.ack(seq)), now)
    return addr, seq


# -- construction and lifecycle errors ----------------------------------------------------


def test_construction_errors_name_the_problem():
    for addr in (("", 7000), ("10.0.0.1", "7000")):
        with pytest.raises(ConfigError, match=r"^addr must be \(host, port\), got "):
            Membership(addr, CFG, random.Random(1))
    for port in (0, 65536):
        with pytest.raises(ConfigError, match=rf"^addr port must be in 1\.\.65535, got {port}$"):
            Membership(("10.0.0.1", port), CFG, random.Random(1))
    for port in (1, 65535):
        assert Membership(("10.0.0.1", port), CFG, random.Random(1)).addr == ("10.0.0.1", port)
    with pytest.raises(ConfigError, match=r"^config must be a swim\.Config$"):
        Membership(ME, {"probe_interval": 1.0}, random.Random(1))  # type: ignore[arg-type]


def test_lifecycle_errors_say_what_to_do():
    core = Membership(ME, CFG, random.Random(1))
    with pytest.raises(RuntimeError, match=r"^call start\(\) first$"):
        core.leave(0.0)
    with pytest.raises(RuntimeError, match=r"^call start\(\) first$"):
        core.join([("10.0.0.2", 1)], 0.0)
    core.start(0.0)
    with pytest.raises(RuntimeError, match=r"^membership already started$"):
        core.start(0.0)
    core.leave(1.0)
    with pytest.raises(RuntimeError, match=r"^this member has left; start\(\) again to rejoin$"):
        core.join([("10.0.0.2", 1)], 2.0)
    with pytest.raises(TypeError, match=r"^not a swim timer: "):
        core.handle_timer(_OddTimer(core._token), 3.0)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _OddTimer:
    token: int


def test_timers_of_a_previous_life_are_stale_after_a_rejoin():
    core, _ = make(2)
    old = core._token
    core.leave(1.0)
    core.start(2.0)
    assert core.handle_timer(ProbeTick(old), 3.0) == []
    assert core.handle_timer(GossipTick(old), 3.0) == []
    assert core.stats.ignored["stale_timer"] == 2


# -- timers: every one the core sets is honoured when the host fires it ---------------------


def test_every_timer_the_core_sets_is_honoured_and_never_in_the_past():
    # Silent peers: probes fail, helpers are asked, suspicions time out, the dead are reaped.
    config = Config.lan(eager_gossip_nodes=0, push_pull_interval=5.0, down_retention=60.0)
    core = Membership(ME, config, random.Random(4), gen=100)
    heap: list = []
    seq = 0
    pings_req = streams = 0

    def run(out: list, now: float) -> None:
        nonlocal seq, pings_req, streams
        for e in out:
            if isinstance(e, SetTimer):
                assert e.at >= now
                seq += 1
                heapq.heappush(heap, (e.at, seq, e.timer))
            elif isinstance(e, Send):
                pings_req += sum(p[0] == codec.PING_REQ for p in decode(e.data, config)[1])
            elif isinstance(e, OpenStream):
                streams += 1
                run(core.handle_stream_failed(e.stream_id, now), now)

    run(core.start(0.0), 0.0)
    peers = [Peer(NodeId("10.0.0.2", 8000 + i, 1), config) for i in range(3)]
    for p in peers:
        run(core.handle_datagram(p.addr, p.packet(codec.alive(p.id, 0, b"")), 0.0), 0.0)
    downs = []
    while heap and heap[0][0] < 200.0:
        at, _, t = heapq.heappop(heap)
        out = core.handle_timer(t, at)
        downs += of_type(out, MemberDown)
        run(out, at)
    assert core.stats.ignored.get("stale_timer", 0) == 0
    assert sorted(d.member.addr for d in downs) == sorted(p.addr for p in peers)
    assert core.stats.declared_down == 3 and core.stats.probes_failed >= 3
    assert pings_req > 0 and streams > 0
    assert core.all_members() == []  # reaped after down_retention


def test_first_timers_fall_within_one_period_of_start():
    config = Config.lan(probe_interval=0.5, probe_timeout=0.2, push_pull_interval=0.5)
    for seed in range(5):
        core = Membership(ME, config, random.Random(seed))
        timers = {type(e.timer): e.at for e in of_type(core.start(10.0), SetTimer)}
        assert 10.0 <= timers[ProbeTick] <= 10.5
        assert 10.0 <= timers[GossipTick] <= 10.2
        assert 10.0 <= timers[PushPullTick] <= 10.5
    off = Membership(ME, Config.lan(push_pull_interval=0), random.Random(1))
    assert PushPullTick not in {type(e.timer) for e in of_type(off.start(0.0), SetTimer)}


# -- dropped and ignored input, by reason (R12) ---------------------------------------------


def _message_of_size(sender: Peer, size: int) -> bytes:
    base = len(sender.packet(codec.message(b"x" * 1000)))
    data = sender.packet(codec.message(b"x" * (1000 + size - base)))
    assert len(data) == size
    return data


def test_a_datagram_of_max_packet_size_is_taken_one_byte_more_is_dropped_as_too_big():
    core, (b,) = make(1)
    out = core.handle_datagram(b.addr, _message_of_size(b, CFG.max_packet_size), 1.0)
    assert of_type(out, MessageReceived)
    assert core.stats.dropped == {} and core.last_dropped == ""
    for _ in range(2):
        out = core.handle_datagram(b.addr, _message_of_size(b, CFG.max_packet_size + 1), 1.0)
        assert out == []
    assert core.stats.dropped == {"too_big": 2} and core.last_dropped == "too_big"
    core.handle_datagram(b.addr, b"\x01\x00\xc1", 1.0)  # a frame whose body is not msgpack
    assert core.stats.dropped == {"too_big": 2, "decode": 1} and core.last_dropped == "decode"
    other = Peer(b.id, Config.lan(label="other"))
    core.handle_datagram(b.addr, other.packet(codec.ping(1, core.identity)), 1.0)
    assert core.last_dropped == "label" and core.stats.malformed == 4


def test_packets_from_ourselves_or_naming_us_as_a_ping_req_target_are_ignored():
    core, (b,) = make(1)
    me = Peer(core.identity, CFG)
    assert feed(core, me, codec.ping(1, core.identity)) == []
    assert core.stats.ignored == {"from_self": 1}
    assert of_type(feed(core, b, codec.ping_req(5, core.identity, True)), (Send, SetTimer)) == []
    assert core.stats.ignored == {"from_self": 1, "ping_req_for_us": 1}
    assert core.handle_stream_request(1, ME, me.stream([]), 1.0) == []  # no reply to ourselves
    assert core.stats.ignored["from_self"] == 2 and core.stats.dropped == {}


def test_a_left_sender_is_ignored_and_not_told_to_renew():
    core, (b, c) = make(2)
    feed(core, c, codec.down(b.id, 0, c.id))
    out = feed(core, b, codec.ping(1, core.identity))
    assert [s.addr for s in of_type(out, Send)] == [b.addr]
    assert (codec.DOWN, b.id, 0, core.identity) in parts_to(out, b.addr)
    assert core.stats.ignored == {"down_sender": 1}
    d = Peer(NodeId("10.0.0.2", 9000, 1), CFG)
    feed(core, d, codec.alive(d.id, 0, b""))
    feed(core, d, codec.down(d.id, 0, d.id))  # d left
    assert of_type(feed(core, d, codec.ping(2, core.identity)), Send) == []
    assert core.stats.ignored == {"down_sender": 2}


def test_streams_too_big_or_malformed_are_dropped_by_reason():
    config = Config.lan(max_packet_size=1024, max_stream_size=2048)
    core, (b,) = make(1, config)

    # A stream of exactly max_stream_size: members with 100-byte metas, the last one's sized
    # to fill it (metas of 32..255 bytes share one length-header size).
    def state(i: int, meta: int) -> tuple:
        return (NodeId("10.0.0.3", 9000 + i, 1), 0, State.ALIVE, b"m" * meta)

    others: list = []
    while len(b.stream([*others, state(99, 100)])) < 2048 - 120:
        others.append(state(len(others), 100))
    base = len(b.stream([*others, state(99, 100)]))
    exact = b.stream([*others, state(99, 100 + 2048 - base)])
    assert len(exact) == 2048
    out = core.handle_stream_request(1, b.addr, exact, 1.0)
    assert of_type(out, StreamReply) and core.stats.dropped == {}
    assert core.handle_stream_request(2, b.addr, exact + b"\x00", 1.0) == []
    assert core.stats.dropped == {"too_big": 1} and core.last_dropped == "too_big"
    (req,) = of_type(core.handle_timer(PushPullTick(core._token), 5.0), OpenStream)
    out = core.handle_stream_reply(req.stream_id, b"\x01\x00\xc1", 5.1)
    assert out == [StreamDone(req.stream_id, False, False)]
    assert core.stats.dropped == {"too_big": 1, "decode": 1} and core.last_dropped == "decode"


def test_a_reply_on_an_unknown_stream_is_ignored():
    core, (b,) = make(1)
    assert core.handle_stream_reply(42, b.stream([(b.id, 0, State.ALIVE, b"")]), 1.0) == []
    assert core.stats.ignored == {"unknown_stream": 1}


# -- counters the runtime exports as metrics -----------------------------------------------


def test_traffic_counters_add_up_to_the_traffic():
    config = Config.lan()  # eager gossip on: its packets count too
    core, peers = make(4, config)
    b, c = peers[0], peers[1]
    out: list = []
    fed = [b.packet(codec.ping(1, core.identity)), c.packet(codec.ping(2, core.identity))]
    fed.append(b.packet(codec.down(c.id, 0, b.id)))  # news (no suspect: probes carry those)
    fed.append(b"\x01garbage")
    before_in, before_bytes = core.stats.packets_in, core.stats.bytes_in
    out0 = core.stats.packets_out, core.stats.bytes_out, core.stats.piggybacked
    for i, data in enumerate(fed):
        out += core.handle_datagram(b.addr, data, 1.0 + i)
    by_addr = {p.addr: p for p in peers}
    for t in range(6):
        out += core.handle_timer(GossipTick(core._token), 10.0 + t * 0.25)
        # Answered probes: a suspect's probe would carry the suspicion as its own part.
        pinged = core.handle_timer(ProbeTick(core._token), 10.0 + t)
        out += pinged
        for s in of_type(pinged, Send):
            seqs = [p[1] for p in decode(s.data, config)[1] if p[0] == codec.PING]
            for seq in seqs:
                fed.append(by_addr[s.addr].packet(codec.ack(seq)))
                out += core.handle_datagram(s.addr, fed[-1], 10.0 + t)
    assert core.stats.packets_in - before_in == len(fed)
    assert core.stats.bytes_in - before_bytes == sum(len(d) for d in fed)
    sends = of_type(out, Send)
    assert core.stats.packets_out - out0[0] == len(sends) > 3
    assert core.stats.bytes_out - out0[1] == sum(len(s.data) for s in sends)
    updates = sum(p[0] in UPDATES for s in sends for p in decode(s.data, config)[1])
    assert core.stats.piggybacked - out0[2] == updates > 1
    # Streams: those we open (push/pull ticks), and two we answer.
    opened = of_type(core.handle_timer(PushPullTick(core._token), 30.0), OpenStream)
    opened += of_type(core.handle_timer(PushPullTick(core._token), 60.0), OpenStream)
    replies = of_type(core.handle_stream_request(7, b.addr, b.stream([]), 61.0), StreamReply)
    replies += of_type(core.handle_stream_request(8, c.addr, c.stream([]), 61.0), StreamReply)
    assert core.stats.streams_out == len(opened) == 4  # one alive and one down member each
    assert core.stats.streams_in == len(replies) == 2
    sent = sum(len(o.data) for o in opened) + sum(len(r.data) for r in replies)
    assert core.stats.stream_bytes_out == sent


def test_event_counters_count_each_event():
    core, peers = make(4)
    b, c, d, e = peers
    feed(core, c, codec.suspect(b.id, 0, c.id), now=1.0)
    feed(core, c, codec.suspect(d.id, 0, c.id), now=1.0)
    feed(core, c, codec.suspect(b.id, 0, e.id), now=1.0)  # a confirmation is no new suspicion
    assert core.stats.suspicions == 2
    for m in (b, d):
        core.handle_timer(SuspicionTimeout(core._token, m.id, 0), 1000.0)
    assert core.stats.declared_down == 2
    old = core.identity
    feed(core, c, codec.down(old, 0, c.id), now=1001.0)
    feed(core, c, codec.down(old, 0, c.id), now=1001.0)  # the old identity: no-op
    feed(core, c, codec.down(core.identity, 0, c.id), now=1001.0)
    assert core.stats.renewals == 2
    feed(core, c, codec.suspect(core.identity, 0, c.id), now=1002.0)
    assert core.stats.refutations == 1


def test_probe_counters_and_awareness_follow_the_probes():
    core, peers = make(3)
    by_addr = {p.addr: p for p in peers}
    tick(core, 10.0)
    tick(core, 11.0)  # the first failed
    tick(core, 12.0)  # the second failed
    assert core.stats.probes == 3 and core.stats.probes_failed == 2
    assert core.awareness.score == 2  # no helpers asked (no IndirectProbe fired): +1 each
    tick(core, 13.0, by_addr)  # concludes the third (failed) and acks the fourth
    score = core.awareness.score
    tick(core, 14.0, by_addr)  # the fourth was answered: one step back
    assert core.awareness.score == score - 1


def test_eager_rounds_are_counted():
    core, peers = make(3, Config.lan(eager_gossip_nodes=1))
    now = drain(core, 1.0)
    b, _c, d = peers
    z = Peer(NodeId("10.0.0.9", 1, 1), CFG)  # a stranger tells us: any member may be picked
    out = feed(core, z, codec.suspect(b.id, 0, z.id), now=now)
    assert len(of_type(out, Send)) == 1 and core.stats.eager_rounds == 2  # our alive, then this
    now = drain(core, now + 1.0)
    feed(core, z, codec.suspect(d.id, 0, z.id), now=now)
    assert core.stats.eager_rounds == 3


# -- an update never goes back to the member it came from (R8) ------------------------------


def _learn(kind: str, core: Membership, b: Peer, c: Peer) -> tuple:
    """Learn something about b (or a new member) from c; returns the update c must not get."""
    x = NodeId("10.0.0.9", 1, 1)
    if kind == "new":
        feed(core, c, codec.alive(x, 0, b""))
        return (codec.ALIVE, x, 0, b"")
    if kind == "alive":
        feed(core, c, codec.alive(b.id, 3, b"m"))
        return (codec.ALIVE, b.id, 3, b"m")
    if kind == "renamed":
        new = NodeId(b.id.host, b.id.port, 2)
        feed(core, c, codec.alive(new, 0, b""))
        return (codec.ALIVE, new, 0, b"")
    if kind == "suspect":
        feed(core, c, codec.suspect(b.id, 0, c.id))
        return (codec.SUSPECT, b.id, 0, c.id)
    if kind == "confirm":
        d = NodeId("10.0.0.9", 2, 1)
        core.handle_datagram(b.addr, b.packet(codec.suspect(b.id, 0, d)), 1.0)
        feed(core, c, codec.suspect(b.id, 0, c.id))
        return (codec.SUSPECT, b.id, 0, c.id)
    if kind == "down":
        feed(core, c, codec.down(b.id, 0, c.id))
        return (codec.DOWN, b.id, 0, c.id)
    if kind == "user":
        feed(core, c, codec.user(x, 1, b"hello"))
        return (codec.USER, x, 1, b"hello")
    states = {
        "pp-new": (x, 0, State.ALIVE, b""),
        "pp-suspect": (b.id, 0, State.SUSPECT, b""),
        "pp-left": (b.id, 0, State.LEFT, b""),
    }[kind]
    core.handle_stream_request(1, c.addr, c.stream([states]), 1.0)
    t = {State.ALIVE: codec.ALIVE, State.SUSPECT: codec.SUSPECT, State.LEFT: codec.DOWN}
    frm = {State.ALIVE: b"", State.SUSPECT: c.id, State.LEFT: b.id}
    return (t[states[2]], states[0], 0, frm[states[2]])


@pytest.mark.parametrize(
    "kind",
    ["new", "alive", "renamed", "suspect", "confirm", "down", "user", "pp-new", "pp-suspect",
     "pp-left"],
)  # fmt: skip
def test_an_update_is_not_sent_back_to_the_member_it_came_from(kind):
    core, (b, c, d) = make(3)
    drain(core, 0.5)
    update = _learn(kind, core, b, c)
    assert update not in told(core, c.addr)
    assert update in told(core, d.addr)


@pytest.mark.parametrize("kind", ["suspect", "down", "alive", "renamed", "user", "confirm"])
def test_updates_about_different_members_do_not_replace_each_other(kind):
    core, (b, e, c, d) = make(4)
    drain(core, 0.5)
    if kind == "confirm":
        one, two = _learn("confirm", core, b, c), _learn("confirm", core, e, c)
    elif kind == "user":
        one = feed(core, c, codec.user(b.id, 1, b"1")) and (codec.USER, b.id, 1, b"1")
        two = feed(core, c, codec.user(b.id, 2, b"2")) and (codec.USER, b.id, 2, b"2")
    else:
        one, two = _learn(kind, core, b, c), _learn(kind, core, e, c)
    got = told(core, d.addr)
    assert one in got and two in got


def test_own_broadcasts_without_a_key_do_not_replace_each_other():
    core, (b,) = make(1)
    core.broadcast(b"one", 1.0)
    core.broadcast(b"two", 1.0)
    assert [p[3] for p in told(core, b.addr) if p[0] == codec.USER] == [b"two", b"one"]


# -- news is pushed at once, other updates wait for the tick (R8) --------------------------


def test_only_state_changes_are_pushed_at_once():
    core, (b, c, d) = make(3, Config.lan())
    now = drain(core, 1.0)
    x = NodeId("10.0.0.9", 1, 1)
    assert of_type(feed(core, c, codec.alive(x, 0, b""), now=now), Send) == []  # not news
    now = drain(core, now + 1.0)
    assert of_type(feed(core, c, codec.alive(b.id, 1, b"new"), now=now), Send) == []  # nor this
    now = drain(core, now + 1.0)
    out = feed(core, c, codec.suspect(b.id, 1, c.id), now=now)
    assert {s.addr for s in of_type(out, Send)} == {d.addr, x.addr}  # news (not back to c)
    now = drain(core, now + 1.0)
    out = feed(core, b, codec.alive(b.id, 2, b"new"), now=now)  # b refutes: news again
    assert (codec.ALIVE, b.id, 2, b"new") in parts_to(out, d.addr, Config.lan())
    assert of_type(out, MemberAlive)[0].member == Member(b.id, 2, State.ALIVE, b"new")


def test_an_eager_round_is_allowed_again_exactly_one_gossip_interval_later():
    config = Config.lan(eager_gossip_nodes=1, gossip_interval=0.25)
    core, (b, c, _d) = make(3, config)
    drain(core, 0.0)
    z = Peer(NodeId("10.0.0.9", 1, 1), config)  # a stranger tells us: any member may be picked
    assert of_type(feed(core, z, codec.suspect(b.id, 0, z.id), now=100.0), Send)
    while core.pending_updates():  # quiet again, within the same instant
        core.handle_timer(GossipTick(core._token), 100.0)
    assert of_type(feed(core, z, codec.suspect(c.id, 0, z.id), now=100.25), Send)


# -- relayed probes and acks (R5) ----------------------------------------------------------


def test_a_ping_is_acked_to_its_sender_with_its_seq():
    core, (b,) = make(1)
    drain(core, 0.5)
    assert parts_to(feed(core, b, codec.ping(4242, core.identity)), b.addr) == [(codec.ACK, 4242)]
    older = NodeId(ME[0], ME[1], 99)  # a ping for an older identity: our current one instead
    assert parts_to(feed(core, b, codec.ping(7, older)), b.addr) == [
        (codec.ALIVE, core.identity, 0, b"")
    ]


def test_a_stale_sender_is_shown_the_newer_identity_at_its_address():
    core, (b,) = make(1)
    old = Peer(NodeId(b.id.host, b.id.port, 0), CFG)
    out = feed(core, old, codec.ping(1, core.identity))
    assert [s.addr for s in of_type(out, Send)] == [b.addr]


def test_stray_nacks_do_not_conclude_a_probe():
    core, peers = make(4)
    by_addr = {p.addr: p for p in peers}
    some = peers[0]
    feed(core, some, codec.nack(1))  # no probe in progress
    target, seq = tick(core, 10.0)
    helper = next(p for p in peers if p.addr != target)
    # A nack for this probe before any helper was asked: not evidence of anything.
    assert of_type(feed(core, helper, codec.nack(seq), now=10.1), MemberSuspect) == []
    out = core.handle_timer(IndirectProbe(core._token, seq), 10.4)
    helpers = [s.addr for s in of_type(out, Send)]
    assert len(helpers) == 3
    for a in helpers:  # nacks for another probe do not count
        assert of_type(feed(core, by_addr[a], codec.nack(seq + 1), now=10.5), MemberSuspect) == []
    assert core.member(target).state is State.ALIVE
    core.handle_datagram(target, by_addr[target].packet(codec.ack(seq)), 10.6)
    for a in helpers:  # acked: nacks arriving after change nothing
        assert of_type(feed(core, by_addr[a], codec.nack(seq), now=10.7), MemberSuspect) == []
    tick(core, 11.0)
    assert core.member(target).state is State.ALIVE and core.stats.probes_failed == 0


def test_with_a_single_helper_its_nack_concludes_the_probe_without_blaming_us():
    core, peers = make(2)
    by_addr = {p.addr: p for p in peers}
    target, seq = tick(core, 10.0)
    out = core.handle_timer(IndirectProbe(core._token, seq), 10.4)
    (helper,) = [s.addr for s in of_type(out, Send)]
    out = feed(core, by_addr[helper], codec.nack(seq), now=10.8)
    assert of_type(out, MemberSuspect)[0].member.addr == target
    assert core.awareness.score == 0  # the helper answered: our own health is fine


def test_an_indirect_step_for_an_old_or_missing_probe_does_nothing():
    core, _peers = make(3)
    assert core.handle_timer(IndirectProbe(core._token, 5), 1.0) == []  # no probe yet
    _t1, s1 = tick(core, 10.0)
    tick(core, 11.0)
    out = core.handle_timer(IndirectProbe(core._token, s1), 11.4)
    assert of_type(out, Send) == []


# -- probe order (R5) ---------------------------------------------------------------------


def test_a_new_member_is_probed_in_the_rest_of_the_current_pass():
    core, peers = make(5)
    by_addr = {p.addr: p for p in peers}
    first = [tick(core, 10.0 + i, by_addr)[0] for i in range(2)]
    x = Peer(NodeId("10.0.0.3", 9000, 1), CFG)
    by_addr[x.addr] = x
    feed(core, x, codec.alive(x.id, 0, b""), now=12.0)
    rest = [tick(core, 12.0 + i, by_addr)[0] for i in range(4)]
    assert sorted(rest) == sorted(set(by_addr) - set(first))


def test_a_returning_member_is_probed_once_in_the_rest_of_the_pass():
    core, peers = make(6)
    by_addr = {p.addr: p for p in peers}
    first = [tick(core, 10.0 + i, by_addr)[0] for i in range(3)]
    b = by_addr[first[1]]
    feed(core, peers[0] if peers[0] is not b else peers[1], codec.down(b.id, 0, b.id), now=13.0)
    back = Peer(NodeId(b.addr[0], b.addr[1], 2), CFG)
    by_addr[b.addr] = back
    out = feed(core, back, codec.alive(back.id, 0, b""), now=13.0)
    assert of_type(out, MemberUp)[0].member == Member(back.id, 0, State.ALIVE, b"")
    rest = [tick(core, 13.0 + i, by_addr)[0] for i in range(4)]
    assert sorted(rest) == sorted((set(by_addr) - set(first)) | {b.addr})


def test_a_member_that_went_down_mid_pass_is_not_probed():
    core, peers = make(4)
    by_addr = {p.addr: p for p in peers}
    first = tick(core, 10.0, by_addr)[0]
    left = [p for p in peers if p.addr != first]
    for p in left[:2]:
        feed(core, p, codec.down(p.id, 0, p.id), now=10.5)
    nxt = [tick(core, 11.0 + i, by_addr)[0] for i in range(3)]
    assert left[0].addr not in nxt and left[1].addr not in nxt


def test_restore_mid_pass_starts_a_fresh_pass_only_when_it_adds_someone():
    core, peers = make(5)
    by_addr = {p.addr: p for p in peers}
    first = [tick(core, 10.0 + i, by_addr)[0] for i in range(2)]
    assert core.restore([Member(peers[0].id, 0, State.ALIVE, b"")], 12.0) == []
    rest = [tick(core, 12.0 + i, by_addr)[0] for i in range(3)]
    assert sorted(first + rest) == sorted(by_addr)  # the pass went on undisturbed
    core2, peers2 = make(5, seed=7)
    by2 = {p.addr: p for p in peers2}
    [tick(core2, 10.0 + i, by2) for i in range(2)]
    x = Peer(NodeId("10.0.0.3", 9000, 1), CFG)
    by2[x.addr] = x
    out = core2.restore(
        [
            Member(NodeId("10.0.0.3", 9001, 1), 0, State.LEFT, b""),
            Member(x.id, 0, State.ALIVE, b""),
        ],
        12.0,
    )
    assert [n.member.id for n in of_type(out, MemberUp)] == [x.id]
    fresh = [tick(core2, 12.0 + i, by2)[0] for i in range(6)]
    assert sorted(fresh) == sorted(by2)  # a fresh pass over everyone, x included
    # Gossip picks among the restored members too.
    restored = Membership(ME, CFG, random.Random(1), gen=100)
    restored.start(0.0)
    restored.restore([Member(x.id, 0, State.ALIVE, b"")], 1.0)
    sends = of_type(restored.handle_timer(GossipTick(restored._token), 1.0), Send)
    assert [s.addr for s in sends] == [x.addr]  # our own alive goes to x


# -- push/pull (R10) -----------------------------------------------------------------------


def test_push_pull_requests_and_replies_carry_the_join_flag_and_our_state():
    core, (b,) = make(1)
    (join,) = of_type(core.join([ME, b.addr], 1.0), OpenStream)  # ourselves skipped, not fatal
    assert join.addr == b.addr and decode(join.data, CFG)[1][0][1] is True
    (pp,) = of_type(core.handle_timer(PushPullTick(core._token), 30.0), OpenStream)
    assert decode(pp.data, CFG)[1][0][1] is False
    (reply,) = of_type(core.handle_stream_request(1, b.addr, b.stream([], join=True), 31.0),
                       StreamReply)  # fmt: skip
    _, parts = decode(reply.data, CFG)
    assert parts[0][1] is False and parts[0][2][0] == (core.identity, 0, State.ALIVE, b"")
    core.leave(32.0)
    (reply,) = of_type(core.handle_stream_request(2, b.addr, b.stream([]), 33.0), StreamReply)
    assert decode(reply.data, CFG)[1][0][2][0] == (core.identity, 0, State.LEFT, b"")


def test_push_pull_merges_left_members_as_left_and_suspicion_of_us_as_a_refutation():
    core, (b, c) = make(2)
    out = core.handle_stream_request(1, c.addr, c.stream([(b.id, 4, State.LEFT, b"")]), 5.0)
    assert of_type(out, MemberDown)[0].member == Member(b.id, 4, State.LEFT, b"")
    core.handle_timer(GossipTick(core._token), 6.0)  # the dead are still gossiped to
    (req,) = of_type(core.handle_timer(PushPullTick(core._token), 30.0), OpenStream)
    gone = NodeId("10.0.0.9", 1, 1)
    core.handle_datagram(c.addr, c.packet(codec.alive(gone, 0, b"")), 29.0)
    reply = c.stream([(core.identity, 3, State.SUSPECT, b""), (gone, 1, State.LEFT, b"")])
    out = core.handle_stream_reply(req.stream_id, reply, 30.1)
    assert core.incarnation == 4 and not of_type(out, IdentityRenewed)
    assert core.member(gone.addr) == Member(gone, 1, State.LEFT, b"")
    assert of_type(out, Send) == []  # a push/pull (not a join) announces nothing
    (req,) = of_type(core.handle_timer(PushPullTick(core._token), 60.0), OpenStream)
    out = core.handle_stream_reply(req.stream_id, c.stream([(core.identity, 0, State.DOWN, b"")]),
                                   60.1)  # fmt: skip
    assert of_type(out, IdentityRenewed)


def test_push_pull_tick_reaches_one_alive_and_one_down_member():
    core, peers = make(5)
    for p in peers[:3]:
        feed(core, peers[4], codec.down(p.id, 0, peers[4].id), now=1.0)
    out = core.handle_timer(PushPullTick(core._token), 30.0)
    addrs = [o.addr for o in of_type(out, OpenStream)]
    assert len(addrs) == 2
    assert core.member(addrs[0]).state is State.ALIVE
    assert core.member(addrs[1]).state is State.DOWN


def test_concurrent_joins_complete_their_own_streams():
    core, (b, c) = make(2)
    reqs = of_type(core.join([b.addr, c.addr], 1.0), OpenStream)
    assert len({r.stream_id for r in reqs}) == 2
    for r, p in reversed(list(zip(reqs, (b, c), strict=True))):
        out = core.handle_stream_reply(r.stream_id, p.stream([(p.id, 0, State.ALIVE, b"")]), 1.1)
        assert out[-1] == StreamDone(r.stream_id, True, True)


def test_a_join_announces_us_to_at_most_join_announce_members():
    config = Config.lan(join_announce=1, eager_gossip_nodes=0)
    core = Membership(ME, config, random.Random(1), gen=5)
    core.start(0.0)
    seed = Peer(NodeId("10.0.0.2", 8000, 1), config)
    others = [(NodeId("10.0.0.3", 9000 + i, 1), 0, State.ALIVE, b"") for i in range(4)]
    (req,) = of_type(core.join([seed.addr], 0.0), OpenStream)
    out = core.handle_stream_reply(req.stream_id, seed.stream(others), 0.1)
    assert len(of_type(out, Send)) == 1


# -- identity, incarnation and meta edges (R1-R4) ------------------------------------------


def test_alive_about_an_older_identity_of_ours_changes_nothing():
    core, (b,) = make(1, gen=100)
    feed(core, b, codec.alive(NodeId(*ME, 99), 50, b"x"))
    assert core.incarnation == 0 and core.identity.gen == 100 and core.stats.refutations == 0


def test_refutation_reaches_the_last_incarnation_before_renewing():
    core, (b,) = make(1, gen=0)
    feed(core, b, codec.suspect(core.identity, INCARNATION_MAX - 1, b.id))
    assert core.incarnation == INCARNATION_MAX and core.identity.gen == 0
    feed(core, b, codec.suspect(core.identity, INCARNATION_MAX, b.id))
    assert core.identity == NodeId(*ME, 1) and core.incarnation == 0


def test_set_meta_raises_the_incarnation_and_renews_at_the_last_one():
    core, (b,) = make(1, gen=0)
    core.set_meta(b"a", 1.0)
    core.set_meta(b"b", 1.0)
    assert core.incarnation == 2
    feed(core, b, codec.suspect(core.identity, INCARNATION_MAX - 1, b.id))
    core.set_meta(b"c", 2.0)
    assert core.identity == NodeId(*ME, 1) and core.incarnation == 0
    assert (codec.ALIVE, core.identity, 0, b"c") in told(core, b.addr)


def test_meta_of_exactly_meta_max_size_is_accepted():
    core = Membership(ME, CFG, random.Random(1), meta=b"m" * CFG.meta_max_size)
    core.start(0.0)
    core.set_meta(b"n" * CFG.meta_max_size, 1.0)
    with pytest.raises(PayloadTooLarge, match="meta is 513 bytes, more than meta_max_size"):
        core.set_meta(b"n" * (CFG.meta_max_size + 1), 1.0)


def test_payload_errors_name_what_is_too_large():
    core, (b,) = make(1)
    with pytest.raises(PayloadTooLarge, match=r"^broadcast payload too large: "):
        core.broadcast(b"x" * 1400, 1.0)
    with pytest.raises(PayloadTooLarge, match=r"^message payload too large: "):
        core.send_message(b.addr, b"x" * 1400, 1.0)


@pytest.mark.parametrize("encrypted", [False, True])
def test_the_largest_accepted_payloads_fit_one_packet(encrypted):
    ring = Keyring([b"k" * 32]) if encrypted else None
    core, (b,) = make(1, keyring=ring)

    def largest(send) -> int:
        lo, hi = 0, CFG.max_packet_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                send(b"x" * mid)
                lo = mid
            except PayloadTooLarge:
                hi = mid - 1
        return lo

    n = largest(lambda p: core.send_message(b.addr, p, 1.0))
    (s,) = of_type(core.send_message(b.addr, b"y" * n, 1.0), Send)
    assert len(s.data) <= CFG.max_packet_size
    assert (codec.MESSAGE, b"y" * n) in decode(s.data, CFG, ring)[1]
    drain(core, 2.0)
    n = largest(lambda p: core.broadcast(p, 3.0))
    drain(core, 3.0)
    core.broadcast(b"z" * n, 4.0)
    sends = of_type(core.handle_timer(GossipTick(core._token), 4.0), Send)
    assert sends and all(len(s.data) <= CFG.max_packet_size for s in sends)
    assert any(p[0] == codec.USER and p[3] == b"z" * n for p in decode(sends[0].data, CFG, ring)[1])


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_large_message_topped_up_with_updates_still_fits_one_packet(encrypted):
    ring = Keyring([b"k" * 32]) if encrypted else None
    config = Config.lan(eager_gossip_nodes=0, label="lbl")
    core, peers = make(80, config, keyring=ring)
    assert len(core.pending_updates()) > 50
    b = peers[0]
    for size in range(0, 1300, 37):
        for s in of_type(core.send_message(b.addr, b"x" * size, 1.0), Send):
            assert len(s.data) <= config.max_packet_size
            decode(s.data, config, ring)


def test_down_about_a_newer_identity_at_a_known_address():
    core, (b, c) = make(2)
    feed(core, c, codec.suspect(b.id, 0, c.id))
    newer = NodeId(b.id.host, b.id.port, 5)
    out = feed(core, c, codec.down(newer, 2, c.id))
    assert of_type(out, MemberDown)[0].member == Member(newer, 2, State.DOWN, b"")
    assert core.all_members() == [
        Member(newer, 2, State.DOWN, b""),
        Member(c.id, 0, State.ALIVE, b""),
    ]
    assert core.suspicion_deadline(b.addr) is None
    assert core.suspicion_confirmations(b.addr) is None


def test_a_renamed_member_has_no_suspicion_pending():
    core, (b, c) = make(2)
    feed(core, c, codec.suspect(b.id, 0, c.id))
    assert core.suspicion_deadline(b.addr) is not None
    assert core.suspicion_confirmations(b.addr) == 0
    feed(core, c, codec.alive(NodeId(b.id.host, b.id.port, 2), 0, b""))
    assert core.suspicion_deadline(b.addr) is None


def test_a_confirmed_suspicion_is_regossiped_and_its_timer_fires():
    core, (b, c, d, e) = make(4)
    feed(core, c, codec.suspect(b.id, 0, c.id), now=10.0)
    out = feed(core, d, codec.suspect(b.id, 0, d.id), now=11.0)
    (st,) = of_type(out, SetTimer)
    assert (codec.SUSPECT, b.id, 0, d.id) in told(core, e.addr)
    out = core.handle_timer(st.timer, st.at)
    assert of_type(out, MemberDown)[0].member.addr == b.addr


def test_a_stale_suspicion_timer_fired_late_does_not_count_a_death():
    core, (b, c) = make(2)
    old = of_type(feed(core, c, codec.suspect(b.id, 0, c.id), now=10.0), SetTimer)[0]
    new = of_type(feed(core, c, codec.suspect(b.id, 1, c.id), now=11.0), SetTimer)[0]
    late = max(old.at, new.at) + 5.0  # a loaded host fires both late, the old one first
    assert core.handle_timer(old.timer, late) == []
    assert of_type(core.handle_timer(new.timer, late), MemberDown)
    assert core.stats.declared_down == 1
    # The same when the address got a newer identity, suspected at the same incarnation.
    core, (b, c) = make(2)
    old = of_type(feed(core, c, codec.suspect(b.id, 0, c.id), now=10.0), SetTimer)[0]
    nb = NodeId(b.id.host, b.id.port, 2)
    feed(core, c, codec.alive(nb, 0, b""), now=10.5)
    new = of_type(feed(core, c, codec.suspect(nb, 0, c.id), now=11.0), SetTimer)[0]
    late = max(old.at, new.at) + 5.0
    assert core.handle_timer(old.timer, late) == []
    assert of_type(core.handle_timer(new.timer, late), MemberDown)
    assert core.stats.declared_down == 1


# -- the dead: gossip to them, forget them (R8, ReapDown) -----------------------------------


def test_a_down_member_is_reaped_once_and_only_its_own_identity():
    config = Config.lan(eager_gossip_nodes=0, down_retention=100.0)
    core, (b, c, d) = make(3, config)
    out = feed(core, c, codec.down(b.id, 0, c.id), now=10.0)
    (reap,) = [e for e in of_type(out, SetTimer) if isinstance(e.timer, ReapDown)]
    assert reap.at == 110.0 and reap.timer.member == b.id
    core.handle_timer(reap.timer, reap.at)
    assert core.member(b.addr) is None
    core.handle_timer(reap.timer, reap.at)  # again: harmless
    # Gossip still picks among those left.
    core.broadcast(b"after", 111.0)
    sent = {s.addr for s in of_type(core.handle_timer(GossipTick(core._token), 111.0), Send)}
    assert sent == {c.addr, d.addr}
    # A reap for an identity that has since been replaced, or that came back, forgets nothing.
    out = feed(core, c, codec.down(d.id, 0, c.id), now=120.0)
    (reap,) = [e for e in of_type(out, SetTimer) if isinstance(e.timer, ReapDown)]
    nd = NodeId(d.id.host, d.id.port, 2)
    feed(core, c, codec.alive(nd, 0, b""), now=121.0)
    core.handle_timer(reap.timer, reap.at)
    assert core.member(d.addr) == Member(nd, 0, State.ALIVE, b"")
    feed(core, c, codec.suspect(nd, 0, c.id), now=122.0)  # active (suspect), same identity
    core.handle_timer(ReapDown(core._token, nd), 300.0)
    assert core.member(d.addr).state is State.SUSPECT


def test_an_update_retires_once_everyone_we_could_tell_has_it():
    config = Config.lan(eager_gossip_nodes=0, down_retention=100.0)
    core, (b, c, d) = make(3, config)
    feed(core, c, codec.down(b.id, 0, c.id), now=10.0)
    drain(core, 10.0)
    core.broadcast(b"x", 11.0)  # c, d and the recently dead b can be told
    told(core, c.addr, 11.0)
    told(core, d.addr, 11.0)
    assert [u for u in core.pending_updates() if u.key[0] == "u"]
    told(core, b.addr, 11.0)
    assert core.pending_updates() == []
    # Once b is reaped, c and d are everyone.
    core.handle_timer(ReapDown(core._token, b.id), 110.0)
    core.broadcast(b"y", 111.0)
    told(core, c.addr, 111.0)
    told(core, d.addr, 111.0)
    assert core.pending_updates() == []


def test_a_member_back_from_the_dead_counts_once_and_is_told_like_the_others():
    core, (b, c) = make(2)
    feed(core, c, codec.down(b.id, 0, c.id), now=10.0)
    assert core.num_members() == 2
    nb = NodeId(b.id.host, b.id.port, 2)
    feed(core, c, codec.alive(nb, 0, b""), now=11.0)  # back before the dead time ends
    assert core.num_members() == 3
    core.broadcast(b"x", 11.0)
    told(core, b.addr, 11.0)
    told(core, c.addr, 11.0)
    assert [u for u in core.pending_updates() if u.key[0] == "u"] == []  # b is no longer "dead"
    # Back after the dead time ended (no longer gossiped to as dead).
    feed(core, c, codec.down(nb, 0, c.id), now=20.0)
    core.handle_timer(GossipTick(core._token), 20.0 + CFG.gossip_to_the_dead_time + 1.0)
    feed(core, c, codec.alive(NodeId(b.id.host, b.id.port, 3), 0, b""), now=60.0)
    assert core.num_members() == 3


def test_recently_dead_members_are_gossiped_to_whenever_they_died():
    config = Config.lan(gossip_nodes=5, eager_gossip_nodes=0)
    core, (b, c) = make(2, config)
    feed(core, c, codec.down(b.id, 0, c.id), now=100.0)
    sent_to = {s.addr for s in of_type(core.handle_timer(GossipTick(core._token), 101.0), Send)}
    assert b.addr in sent_to


def test_a_leaving_member_keeps_gossiping_until_its_left_is_spread():
    core, peers = make(10)
    feed(core, peers[1], codec.down(peers[0].id, 0, peers[1].id), now=1.0)  # recently dead
    drain(core, 1.0)
    core.leave(5.0)
    assert not core.leave_done
    now, rounds = 5.2, 0
    while not core.leave_done:
        out = core.handle_timer(GossipTick(core._token), now)
        assert any(
            (codec.DOWN, core.identity, 0, core.identity) in decode(s.data, CFG)[1]
            for s in of_type(out, Send)
        )
        rounds += 1
        now += 0.2
    assert rounds >= 2


# -- user broadcasts (R9) -------------------------------------------------------------------


def test_broadcasts_are_relayed_and_delivered_once():
    core, (_b, c, d) = make(3)
    x = NodeId("10.0.0.9", 1, 1)
    got = []
    for seq in (1, 2, 1):
        got += of_type(feed(core, c, codec.user(x, seq, f"m{seq}".encode())), BroadcastReceived)
    assert [g.payload for g in got] == [b"m1", b"m2"]
    relayed = [p for p in told(core, d.addr) if p[0] == codec.USER]
    assert sorted(p[2] for p in relayed) == [1, 2]


def test_the_memory_of_seen_broadcasts_is_bounded_and_forgets_the_oldest_first():
    core, (c,) = make(1)
    x = NodeId("10.0.0.9", 1, 1)
    for seq in range(1, SEEN_BROADCASTS_MAX + 2):
        core.handle_datagram(c.addr, c.packet(codec.user(x, seq, b"")), 1.0)

    def delivered(seq: int) -> bool:
        return bool(of_type(feed(core, c, codec.user(x, seq, b"")), BroadcastReceived))

    assert not delivered(SEEN_BROADCASTS_MAX + 1) and not delivered(2)
    assert delivered(1)  # the oldest was forgotten to make room
