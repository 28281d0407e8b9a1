"""Dissemination (R8-R10): the queue's order and limits, packet sizes, user payloads, push/pull."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from swim import codec
from swim.broadcast import BroadcastQueue
from swim.config import Config
from swim.core import Membership, PayloadTooLarge
from swim.events import (
    BroadcastReceived,
    GossipTick,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
    MessageReceived,
    OpenStream,
    PushPullTick,
    Send,
    StreamDone,
    StreamReply,
)
from swim.keyring import Keyring
from swim.member import NodeId, State
from swim.testing import LocalNetwork, Peer, decode, of_type

CFG = Config.lan()
ME = ("10.0.0.1", 7000)


def cluster(
    npeers: int, *, config: Config = CFG, meta: bytes = b"", keyring=None, sent: list | None = None
):
    """Our core at ME knowing ``npeers`` peers; ``sent`` collects the setup's Sends."""
    core = Membership(ME, config, random.Random(3), gen=100, keyring=keyring)
    core.start(0.0)
    peers = [Peer(NodeId("10.0.0.2", 8000 + i, 1), config, keyring) for i in range(npeers)]
    for p in peers:
        out = core.handle_datagram(p.addr, p.packet(codec.alive(p.id, 0, meta)), 0.0)
        if sent is not None:
            sent += of_type(out, Send)
    return core, peers


# -- the queue --------------------------------------------------------------------------------


def test_queue_sends_least_sent_first_newest_first_among_equals():
    q = BroadcastQueue()
    q.push("a", b"A" * 10)
    q.push("b", b"B" * 10)
    assert q.fill(10, 5) == [b"B" * 10]  # newest first
    assert q.fill(10, 5) == [b"A" * 10]
    q.push("c", b"C" * 10)
    # C has 0 sends; A and B 1 each, A reached that count last.
    assert q.fill(20, 5) == [b"C" * 10, b"A" * 10]
    assert [(u.key, u.transmits) for u in q.snapshot()] == [("c", 1), ("b", 1), ("a", 2)]


def test_queue_limit_and_replacement():
    q = BroadcastQueue()
    q.push("a", b"x" * 10)
    for _ in range(3):
        assert q.fill(100, 3) == [b"x" * 10]
    assert q.fill(100, 3) == [] and "a" not in q
    q.push("b", b"old" * 4)
    q.fill(100, 3)
    q.push("b", b"new" * 4)  # a newer update about b replaces the old one, count reset
    assert q.transmits("b") == 0 and len(q) == 1
    assert q.fill(100, 3) == [b"new" * 4]


def test_queue_retires_updates_when_the_limit_shrinks():
    q = BroadcastQueue()
    q.push("a", b"x" * 10)
    for _ in range(4):
        q.fill(100, 8)
    assert q.fill(100, 4) == [] and len(q) == 0


def test_queue_never_sends_an_update_twice_to_one_address_nor_back_to_its_source():
    q = BroadcastQueue()
    q.push("a", b"x" * 10, known_by="src")
    assert q.fill(100, 5, "src") == []
    assert q.fill(100, 5, "m1") == [b"x" * 10]
    assert q.fill(100, 5, "m1") == []
    assert q.fill(100, 5, "m2") == [b"x" * 10]
    assert q.transmits("a") == 2


def test_queue_retires_what_everyone_already_has():
    q = BroadcastQueue()
    q.push("a", b"x" * 10, known_by="m1")
    q.push("b", b"y" * 10)
    assert q.fill(100, 8, "m2", audience=2) == [b"y" * 10, b"x" * 10]
    assert "a" not in q  # m1 and m2: the whole audience has it
    assert q.fill(100, 8, "m1", audience=2) == [b"y" * 10]
    assert len(q) == 0


def test_queue_skips_what_does_not_fit_and_takes_smaller_parts():
    q = BroadcastQueue()
    q.push("small", b"s" * 10)
    q.push("big", b"b" * 100)
    assert q.fill(50, 5) == [b"s" * 10]
    assert q.transmits("big") == 0


# -- packets from the core -------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True])
def test_packets_never_exceed_max_packet_size(encrypted):
    ring = Keyring([b"k" * 32]) if encrypted else None
    config = Config.lan(label="a-cluster-label")
    core, _peers = cluster(200, config=config, meta=b"m" * 512, keyring=ring)
    assert len(core.pending_updates()) > 100
    sizes = []
    for i in range(50):
        for s in of_type(core.handle_timer(GossipTick(1), 1.0 + i * 0.2), Send):
            sizes.append(len(s.data))
            decode(s.data, config, ring)  # and they are valid frames
    assert sizes and max(sizes) <= config.max_packet_size
    assert max(sizes) > config.max_packet_size - 600  # and packets are actually filled


@pytest.mark.parametrize("eager", [0, 3])
def test_each_update_rides_at_most_its_limit(eager):
    config = Config.lan(eager_gossip_nodes=eager)
    sent: list = []
    core, _peers = cluster(30, config=config, sent=sent)
    assert bool(sent) == bool(eager)  # our own alive is news: pushed during the join
    limit = core.retransmit_limit
    assert limit == config.retransmit_limit(31) == 8
    now = 1.0
    for _ in range(100):
        sent += of_type(core.handle_timer(GossipTick(1), now), Send)
        now += 0.2
    counts: Counter = Counter()
    for s in sent:
        for p in decode(s.data, config)[1]:
            if p[0] in (codec.ALIVE, codec.SUSPECT, codec.DOWN):
                counts[(p[1], p[2], p[0])] += 1
    assert core.pending_updates() == []
    assert max(counts.values()) == limit
    if not eager:
        assert len(counts) == 31  # every member's alive (and ours) went out ...
        assert set(counts.values()) == {limit}  # ... exactly `limit` times each
    # With eager gossip our alive went to the first peer at once, when it was the whole
    # audience, and retired: later peers learn it from that peer (R8's retirement rule).


def _news_sends(out: list, config: Config = CFG) -> dict[tuple, list]:
    """Address -> member updates in the Sends of ``out``."""
    return {
        s.addr: [p for p in decode(s.data, config)[1] if p[0] in (codec.SUSPECT, codec.DOWN)]
        for s in of_type(out, Send)
    }


def _drain(core: Membership, now: float) -> float:
    """Gossip ticks until nothing is queued (a quiet cluster); returns the time reached."""
    while core.pending_updates():
        core.handle_timer(GossipTick(1), now)
        now += 0.2
    return now


def test_news_breaking_a_quiet_spell_is_pushed_at_once():
    core, peers = cluster(30)
    b, c, d = peers[0], peers[1], peers[2]
    now = _drain(core, 1.0)
    out = core.handle_datagram(c.addr, c.packet(codec.down(b.id, 0, c.id)), now)
    sends = _news_sends(out)
    assert len(sends) == CFG.eager_gossip_nodes and c.addr not in sends  # not back to c
    assert all((codec.DOWN, b.id, 0, c.id) in parts for parts in sends.values())
    # News while earlier news is still queued (churn) waits for the tick, which batches it.
    out = core.handle_datagram(c.addr, c.packet(codec.suspect(d.id, 0, c.id)), now + 0.5)
    assert of_type(out, MemberSuspect) and _news_sends(out) == {}
    sends = _news_sends(core.handle_timer(GossipTick(1), now + 0.6))
    assert len(sends) == CFG.gossip_nodes
    # Old news (a repeated DOWN) is not news.
    now = _drain(core, now + 1.0)
    out = core.handle_datagram(d.addr, d.packet(codec.down(b.id, 0, c.id)), now)
    assert of_type(out, Send) == []


def test_at_most_one_eager_round_per_gossip_interval():
    core, (b,) = cluster(1)
    now = _drain(core, 1.0)

    def accused(inc: int, at: float) -> list:
        return of_type(
            core.handle_datagram(b.addr, b.packet(codec.suspect(core.identity, inc, b.id)), at),
            Send,
        )

    # Our refutation goes to b at once; b was the whole audience, so the queue is quiet again.
    assert len(accused(0, now)) == 1 and core.pending_updates() == []
    assert accused(1, now + 0.1) == []  # quiet, but this interval already had its round
    assert of_type(core.handle_timer(GossipTick(1), now + 0.15), Send)  # the tick sends it
    assert len(accused(2, now + 0.35)) == 1  # a new interval: at once again
    assert core.incarnation == 3


def test_news_goes_at_once_to_alive_members_only():
    core, peers = cluster(4)
    b, c, d, e = peers
    now = _drain(core, 1.0)
    core.handle_datagram(c.addr, c.packet(codec.suspect(d.id, 0, c.id)), now)
    now = _drain(core, now + 1.0)
    out = core.handle_datagram(c.addr, c.packet(codec.down(b.id, 0, c.id)), now)
    # c told us, d is suspect (maybe slow: spare its queue), b is the news itself: only e.
    assert list(_news_sends(out)) == [e.addr]


def test_a_refutation_is_pushed_at_once():
    core, peers = cluster(10)
    c = peers[1]
    now = _drain(core, 1.0)
    out = core.handle_datagram(c.addr, c.packet(codec.suspect(core.identity, 0, c.id)), now)
    sends = of_type(out, Send)
    assert len(sends) == CFG.eager_gossip_nodes
    for s in sends:
        assert (codec.ALIVE, core.identity, 1, b"") in decode(s.data, CFG)[1]


def test_without_eager_gossip_news_waits_for_the_tick():
    config = Config.lan(eager_gossip_nodes=0)
    core, peers = cluster(30, config=config)
    b, c = peers[0], peers[1]
    now = _drain(core, 1.0)
    out = core.handle_datagram(c.addr, c.packet(codec.down(b.id, 0, c.id)), now)
    assert of_type(out, Send) == []
    sends = _news_sends(core.handle_timer(GossipTick(1), now + 0.2), config)
    assert len(sends) == config.gossip_nodes


def test_gossip_sends_nothing_when_there_is_nothing_new():
    core, _ = cluster(5)
    for i in range(40):
        core.handle_timer(GossipTick(1), 1.0 + i * 0.2)
    assert core.pending_updates() == []
    assert of_type(core.handle_timer(GossipTick(1), 20.0), Send) == []


def test_gossip_reaches_recently_down_members_only():
    core, peers = cluster(2, config=Config.lan(gossip_nodes=5, eager_gossip_nodes=0))
    b, c = peers
    core.handle_datagram(c.addr, c.packet(codec.down(b.id, 0, c.id)), 10.0)
    sent_to = {s.addr for s in of_type(core.handle_timer(GossipTick(1), 11.0), Send)}
    assert b.addr in sent_to  # down 1 s ago: it may still learn it must renew
    core.broadcast(b"news", 50.0)
    sent_to = {s.addr for s in of_type(core.handle_timer(GossipTick(1), 50.0), Send)}
    assert b.addr not in sent_to and c.addr in sent_to


# -- user payloads ----------------------------------------------------------------------------


def test_user_broadcast_reaches_every_member_exactly_once():
    net = LocalNetwork(seed=7, config=Config.lan())
    seed = net.add()
    nodes = [seed] + [net.add(seeds=[seed.addr]) for _ in range(24)]
    assert net.run_until_true(net.converged, 5.0)
    net.apply(nodes[3], nodes[3].broadcast(b"hello all", net.now))
    net.run_for(10.0)
    got = Counter(
        a for _, a, n in net.notifications if isinstance(n, BroadcastReceived) and n.payload
    )
    assert set(got) == {n.addr for n in nodes} - {nodes[3].addr}
    assert set(got.values()) == {1}
    origin = {n.origin for _, _, n in net.notifications if isinstance(n, BroadcastReceived)}
    assert origin == {nodes[3].identity}


def test_user_broadcast_key_replaces_a_pending_one():
    core, _ = cluster(3)
    core.broadcast(b"v1", 1.0, key="load")
    core.broadcast(b"v2", 1.0, key="load")
    users = [u for u in core.pending_updates() if u.key[0] == "u"]
    assert len(users) == 1
    parts = decode(of_type(core.handle_timer(GossipTick(1), 1.0), Send)[0].data, CFG)[1]
    assert [p[3] for p in parts if p[0] == codec.USER] == [b"v2"]


def test_oversized_user_payloads_are_refused():
    core, peers = cluster(1)
    with pytest.raises(PayloadTooLarge, match="broadcast"):
        core.broadcast(b"x" * 1400, 1.0)
    with pytest.raises(PayloadTooLarge, match="message"):
        core.send_message(peers[0].addr, b"x" * 1400, 1.0)
    with pytest.raises(PayloadTooLarge, match="meta"):
        core.set_meta(b"x" * 513, 1.0)
    core.broadcast(b"x" * 1300, 1.0)  # what fits is fine


def test_direct_message_is_delivered_with_its_sender():
    core, peers = cluster(1)
    b = peers[0]
    (send,) = of_type(core.send_message(b.addr, b"ping app", 1.0), Send)
    assert send.addr == b.addr
    assert (codec.MESSAGE, b"ping app") in decode(send.data, CFG)[1]
    out = core.handle_datagram(b.addr, b.packet(codec.message(b"reply")), 1.1)
    assert of_type(out, MessageReceived) == [MessageReceived(b.id, b"reply")]


def test_meta_change_is_gossiped_with_a_new_incarnation():
    net = LocalNetwork(seed=2)
    a = net.add(meta=b"v1")
    b = net.add(seeds=[a.addr])
    net.run_for(1.0)
    assert b.member(a.addr).meta == b"v1"
    net.apply(a, a.set_meta(b"v2", net.now))
    assert a.incarnation == 1
    net.run_for(1.0)
    assert b.member(a.addr).meta == b"v2"
    assert any(
        isinstance(n, MemberUpdated) and n.member.meta == b"v2" for *_, n in net.notifications
    )


# -- push/pull --------------------------------------------------------------------------------


def test_push_pull_request_is_answered_with_our_state_and_merged():
    core, peers = cluster(2)
    b, c = peers
    x = NodeId("10.0.0.9", 1, 1)
    payload = b.stream(
        [
            (b.id, 0, State.ALIVE, b""),
            (c.id, 0, State.DOWN, b""),  # remote DOWN becomes a local SUSPECT
            (x, 4, State.ALIVE, b"x-meta"),  # a member we did not know
        ]
    )
    out = core.handle_stream_request(1, b.addr, payload, 5.0)
    (reply,) = of_type(out, StreamReply)
    assert reply.request_id == 1
    _, parts = decode(reply.data, CFG)
    states = {s[0]: s[2] for s in parts[0][2]}
    assert states[core.identity] is State.ALIVE and states[b.id] is State.ALIVE
    assert x not in states  # the reply is our state before merging
    assert of_type(out, MemberSuspect)[0].member.id == c.id
    assert of_type(out, MemberUp)[0].member.meta == b"x-meta"


def test_push_pull_tick_opens_a_stream_to_one_alive_member():
    core, peers = cluster(3)
    out = core.handle_timer(PushPullTick(1), 30.0)
    (req,) = of_type(out, OpenStream)
    assert req.addr in {p.addr for p in peers} and not req.join
    assert core.handle_stream_reply(req.stream_id, b"garbage", 30.1) == [
        StreamDone(req.stream_id, False, False)
    ]
    assert core.stats.dropped


def test_join_merges_the_seed_state_and_announces_us():
    core = Membership(ME, CFG, random.Random(1), gen=5)
    core.start(0.0)
    seed = Peer(NodeId("10.0.0.2", 8000, 1), CFG)
    others = [NodeId("10.0.0.3", 9000 + i, 1) for i in range(4)]
    (req,) = of_type(core.join([seed.addr, ME], 0.0), OpenStream)
    assert req.join and req.addr == seed.addr
    reply = seed.stream(
        [(seed.id, 0, State.ALIVE, b"")] + [(o, 0, State.ALIVE, b"") for o in others]
    )
    out = core.handle_stream_reply(req.stream_id, reply, 0.1)
    assert len(of_type(out, MemberUp)) == 5
    announced = {s.addr for s in of_type(out, Send)}
    assert announced == {seed.addr} | {o.addr for o in others}
    assert out[-1] == StreamDone(req.stream_id, True, True)
    assert core.handle_stream_failed(req.stream_id, 0.2) == []  # already finished


def test_a_failed_join_stream_reports_failure():
    core = Membership(ME, CFG, random.Random(1))
    core.start(0.0)
    (req,) = of_type(core.join([("10.0.0.2", 1)], 0.0), OpenStream)
    assert core.handle_stream_failed(req.stream_id, 1.0) == [StreamDone(req.stream_id, False, True)]


def test_queue_is_bounded_and_forgets_the_most_sent_oldest_first():
    q = BroadcastQueue(max_items=3)
    for k in "abc":
        q.push(k, k.encode() * 10)
    q.fill(10, 5, "m1")  # c goes out once
    q.push("d", b"d" * 10)
    assert "c" not in q and len(q) == 3
    q.push("e", b"e" * 10)
    assert "a" not in q and [u.key for u in q.snapshot()] == ["e", "d", "b"]


def test_leave_completes_even_in_a_two_member_cluster():
    net = LocalNetwork(seed=3, config=Config.lan())
    a = net.add()
    b = net.add(seeds=[a.addr])
    net.run_for(2.0)
    net.apply(b, b.leave(net.now))
    assert net.run_until_true(lambda: b.leave_done, timeout=2.0)  # sent, maybe in flight
    net.run_for(0.01)
    assert a.member(b.addr).state is State.LEFT
