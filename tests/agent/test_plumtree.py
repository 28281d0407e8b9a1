"""The Plumtree core (``corrosion.core.plumtree``) on its own, sans IO: a few cores wired by a
tiny in-test network with a fixed link delay, where chosen frames can be dropped."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import msgpack
import pytest

from corrosion.core.changeset import K_GRAFT, K_IHAVE, K_PRUNE, decode_frame
from corrosion.core.plumtree import MsgId, PeerFrame, Plumtree, PlumtreeConfig, decode_ids
from corrosion.core.replication import ReplicationConfig, Replicator
from corrosion.core.store import Store

DELAY = 0.05


def message_frame(mid: MsgId) -> bytes:
    """A stand-in for a changeset frame: the core treats message frames as opaque bytes."""
    return b"M" + msgpack.packb(list(mid))


class Net:
    """``n`` Plumtree cores that know each other, delivering after ``DELAY``; ``drop(src, dst,
    data)`` True loses a frame. Counts the copies of each message each node receives."""

    def __init__(self, n: int, seed: int = 1, **config) -> None:
        self.actors = [bytes([i + 1]) * 16 for i in range(n)]
        self.held: dict[bytes, set[MsgId]] = {a: set() for a in self.actors}
        self.cores = {
            a: Plumtree(
                a,
                PlumtreeConfig(**config),
                random.Random(seed * 1000 + i),
                self.held[a].__contains__,
            )
            for i, a in enumerate(self.actors)
        }
        for core in self.cores.values():
            for a in self.actors:
                core.peer_up(a)
        self.now = 0.0
        self.queue: list[tuple[float, int, bytes, bytes, bytes]] = []
        self.seq = 0
        self.copies: dict[tuple[bytes, MsgId], int] = {}
        self.down: set[bytes] = set()
        self.drop: Callable[[bytes, bytes, bytes], bool] = lambda src, dst, data: False

    def send(self, src: bytes, frames: list[PeerFrame]) -> None:
        for f in frames:
            if f.actor in self.down or self.drop(src, f.actor, f.data):
                continue
            self.seq += 1
            heapq.heappush(self.queue, (self.now + DELAY, self.seq, src, f.actor, f.data))

    def write(self, origin: bytes, version: int) -> MsgId:
        mid = (origin, version, 0, 0)
        self.held[origin].add(mid)
        self.send(origin, self.cores[origin].broadcast([mid], [message_frame(mid)], self.now))
        return mid

    def deliver(self, src: bytes, dst: bytes, data: bytes) -> None:
        core = self.cores[dst]
        if data[:1] == b"M":
            mid = tuple(msgpack.unpackb(data[1:]))
            self.copies[(dst, mid)] = self.copies.get((dst, mid), 0) + 1
            if mid in self.held[dst]:
                self.send(dst, core.on_duplicate(src, mid))
            else:
                self.held[dst].add(mid)
                self.send(dst, core.on_message(src, mid, data, self.now))
            return
        kind, fields = decode_frame(data)
        if kind == K_PRUNE:
            core.on_prune(src, fields[0])
        elif kind == K_IHAVE:
            core.on_ihave(src, decode_ids(fields), self.now)
        elif kind == K_GRAFT:
            self.send(dst, core.on_graft(src, decode_ids(fields), self.now))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            wakes = [
                (w, a)
                for a, c in self.cores.items()
                if a not in self.down and (w := c.wake_at) is not None
            ]
            t_wake, waker = min(wakes) if wakes else (float("inf"), b"")
            t_msg = self.queue[0][0] if self.queue else float("inf")
            if min(t_wake, t_msg) > end:
                self.now = end
                return
            if t_msg <= t_wake:
                self.now, _, src, dst, data = heapq.heappop(self.queue)
                if dst not in self.down:
                    self.deliver(src, dst, data)
            else:
                self.now = t_wake
                self.send(waker, self.cores[waker].tick(self.now))

    def fail(self, actor: bytes) -> None:
        self.down.add(actor)
        for a, core in self.cores.items():
            if a != actor:
                core.peer_down(actor)

    def reached(self, mid: MsgId) -> list[bytes]:
        return [a for a in self.actors if a not in self.down and mid in self.held[a]]

    def live(self) -> list[bytes]:
        return [a for a in self.actors if a not in self.down]


def formed(n: int = 30, origin: int = 0, warmup: int = 3, **config) -> tuple[Net, bytes]:
    net = Net(n, **config)
    root = net.actors[origin]
    for v in range(1, warmup + 1):
        net.write(root, v)
        net.run(1.0)
    return net, root


def test_first_messages_flood_then_prunes_leave_a_tree_with_one_copy_per_node():
    net, root = formed(warmup=1)
    first = (root, 1, 0, 0)
    assert len(net.reached(first)) == 30
    assert sum(net.copies[(a, first)] for a in net.actors[1:]) > 29  # duplicates at first...
    assert sum(c.stats.prunes_sent for c in net.cores.values()) > 0  # ...each one PRUNEd
    for v in range(2, 6):
        mid = net.write(root, v)
        net.run(1.0)
        assert len(net.reached(mid)) == 30
        # a spanning tree: every other node receives the message exactly once
        assert [net.copies[(a, mid)] for a in net.actors[1:]] == [1] * 29


def test_prune_removes_the_later_sender_from_its_eager_set():
    net = Net(12, eager_fanout=11)  # everyone pushes to everyone: every late copy is pruned
    root = net.actors[0]
    mid = net.write(root, 1)
    net.run(1.0)
    assert len(net.reached(mid)) == 12
    late = [
        (a, b)
        for a in net.actors[1:]
        for b in net.actors[1:]
        if a != b and b in net.cores[a].eager_peers(root)
    ]
    # after the flood, a relaying node keeps no eager link to a node that already had the
    # message from someone else: at most the 11 first-hop links of the root stay
    assert late == []
    assert sorted(net.cores[root].eager_peers(root)) == net.actors[1:]
    mid = net.write(root, 2)
    net.run(1.0)
    assert [net.copies[(a, mid)] for a in net.actors[1:]] == [1] * 11


def test_graft_repairs_an_eager_message_lost_after_ihave():
    net, root = formed()
    victim = net.actors[7]
    lost: list[bytes] = []

    def drop(src: bytes, dst: bytes, data: bytes) -> bool:
        if dst == victim and data[:1] == b"M" and not lost:  # the victim's eager copy
            lost.append(src)
            return True
        return False

    net.drop = drop
    mid = net.write(root, 10)
    net.run(2.0)
    assert lost, "the victim should have been sent the message by its parent"
    assert mid in net.held[victim], "IHAVE then GRAFT should have brought the lost message"
    assert net.copies[(victim, mid)] == 1
    assert net.cores[victim].stats.grafts_sent >= 1
    # the announcer that answered now pushes this origin's messages to the victim eagerly
    assert any(victim in net.cores[a].eager_peers(root) for a in net.actors if a != lost[0])
    assert len(net.reached(mid)) == 30


def test_after_a_member_fails_its_subtree_is_repaired_by_grafts():
    net, root = formed()
    # an inner node of the tree: one that pushes this origin's messages to others
    inner = next(a for a in net.actors[1:] if net.cores[a].eager_peers(root))
    net.fail(inner)
    for v in range(10, 14):
        mid = net.write(root, v)
        net.run(2.0)
        assert sorted(net.reached(mid)) == sorted(net.live())
    # and the repaired tree is a tree again: one copy per node
    mid = net.write(root, 20)
    net.run(2.0)
    assert [net.copies[(a, mid)] for a in net.live() if a != root] == [1] * 28


def test_a_member_that_comes_up_is_announced_to_and_grafts_itself_in():
    net, root = formed(n=20)
    newcomer = bytes([99]) * 16
    held: set[MsgId] = set()
    net.actors.append(newcomer)
    net.held[newcomer] = held
    net.cores[newcomer] = Plumtree(newcomer, PlumtreeConfig(), random.Random(5), held.__contains__)
    for a in net.actors:
        net.cores[newcomer].peer_up(a)
        net.cores[a].peer_up(newcomer)
    mid = net.write(root, 10)
    net.run(2.0)
    assert mid in held


def test_runs_are_deterministic():
    def trace() -> list:
        net, root = formed(n=20)
        return sorted(net.copies.items()) + [net.cores[a].eager_peers(root) for a in net.actors]

    assert trace() == trace()


@pytest.mark.parametrize(
    "fields", [[], [[["x", 1, 0, 0]]], [[[b"a" * 16, 1, 0]]], [[[b"a" * 16, "1", 0, 0]]], [3]]
)
def test_malformed_ids_are_refused(fields):
    assert decode_ids(fields) is None


def test_a_fanout_node_drops_plumtree_frames_as_malformed(tmp_path):
    """Old (or fan-out) peers ignore the new control frames: counted, nothing else changes."""
    from corrosion.core.changeset import encode_control

    rep = Replicator(Store(tmp_path / "a.db"), ReplicationConfig(), random.Random(1), lambda: 0)
    frame = encode_control(K_IHAVE, [[b"b" * 16, 1, 0, 0]])
    assert rep.handle_frame(("127.0.0.1", 1), frame, 0.0, sender=b"b" * 16) == []
    assert rep.stats.malformed == 1 and rep.queue == []
    rep.store.close()


def test_broadcast_mode_is_checked():
    with pytest.raises(ValueError, match="broadcast_mode"):
        ReplicationConfig(broadcast_mode="flood")


def test_lazy_peers_are_the_ring_successors_not_eager_after_prunes():
    """Every node announces to the first ``lazy_fanout`` members after it on the origin's ring
    that it does not push to, also after PRUNEs took peers out of its eager set."""
    net, root = formed(n=25)
    assert sum(c.stats.prunes_received for c in net.cores.values()) > 0
    for a in net.actors:
        tree = net.cores[a].tree(root)
        assert tree.after and not set(tree.after) & {a, root}
        assert list(tree.lazy) == [x for x in tree.after if x not in tree.eager][:2]


def test_a_second_copy_from_the_first_sender_prunes_nothing():
    """The answer to a repeated GRAFT (or a datagram the network duplicated) comes from the
    node that delivered the first copy: pruning it would cut this node off the tree."""
    net = Net(5)
    a, parent, other = net.actors[0], net.actors[1], net.actors[2]
    core = net.cores[a]
    mid = (net.actors[4], 1, 0, 0)
    core.on_message(parent, mid, message_frame(mid), 0.0)
    assert core.on_duplicate(parent, mid) == []
    [prune] = core.on_duplicate(other, mid)
    assert prune.actor == other and decode_frame(prune.data) == (K_PRUNE, [[mid[0]]])


def test_only_the_newest_max_kept_frames_answer_grafts():
    net = Net(3, max_kept=2)
    core, asker = net.cores[net.actors[0]], net.actors[1]
    ids = [net.write(net.actors[0], v) for v in (1, 2, 3)]
    assert core.on_graft(asker, ids[:1], net.now) == []  # the oldest was let go
    assert [f.data for f in core.on_graft(asker, ids[1:], net.now)] == [
        message_frame(m) for m in ids[1:]
    ]
