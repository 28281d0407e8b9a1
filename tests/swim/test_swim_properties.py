"""Property tests: for any sequence of events the invariants hold; no bytes make the core raise."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swim import codec
from swim.broadcast import BroadcastQueue
from swim.config import Config
from swim.core import Membership
from swim.events import Send
from swim.keyring import Keyring
from swim.member import NodeId, State
from swim.testing import LocalNetwork, Peer

KEY = b"k" * 32

# -- arbitrary input never raises ------------------------------------------------------------


def fresh(keyring: Keyring | None = None, label: str = "") -> Membership:
    core = Membership(("10.0.0.1", 7000), Config.lan(label=label), random.Random(0), gen=5,
                      keyring=keyring)  # fmt: skip
    core.start(0.0)
    p = Peer(NodeId("10.0.0.2", 8000, 1), core.config, keyring)
    core.handle_datagram(p.addr, p.packet(codec.alive(p.id, 0, b"")), 0.0)
    return core


@settings(max_examples=300)
@given(data=st.binary(max_size=2000))
def test_handle_datagram_never_raises_on_arbitrary_bytes(data):
    for core in (fresh(), fresh(Keyring([KEY]), "lbl")):
        before = core.stats.malformed
        out = core.handle_datagram(("1.2.3.4", 5), data, 1.0)
        assert isinstance(out, list)
        assert core.stats.malformed in (before, before + 1)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=25,
)
identities = st.builds(
    lambda h, p, g: [h, p, g],
    st.sampled_from(["10.0.0.1", "10.0.0.2", "x"]),
    st.sampled_from([7000, 8000, 1]),
    st.integers(min_value=0, max_value=9),
)
parts = st.one_of(
    st.tuples(st.just(0), st.integers(0, 2**32 - 1), st.integers(0, 9)).map(list),
    st.tuples(st.sampled_from([1, 3]), st.integers(0, 2**32 - 1)).map(list),
    st.tuples(st.just(2), st.integers(0, 9), identities, st.booleans()).map(list),
    st.tuples(st.just(4), identities, st.integers(0, 2**32 - 1), st.binary(max_size=8)).map(list),
    st.tuples(st.sampled_from([5, 6]), identities, st.integers(0, 2**32 - 1), identities).map(list),
    st.tuples(st.just(7), identities, st.integers(0, 9), st.binary(max_size=8)).map(list),
    st.tuples(st.just(8), st.binary(max_size=8)).map(list),
    st.lists(msgpack_values, max_size=5),
)


@settings(max_examples=150)
@given(sender=identities | msgpack_values, body=st.lists(parts, max_size=8))
def test_handle_datagram_never_raises_on_structured_garbage(sender, body):
    core = fresh()
    raw = msgpack.packb([sender, *body], use_bin_type=True)
    frame = codec.Framer(b"").seal(raw)
    core.handle_datagram(("1.2.3.4", 5), frame, 1.0)
    core.handle_stream_request(1, ("1.2.3.4", 5), frame, 1.0)
    assert core.incarnation >= 0 and core.identity.addr == ("10.0.0.1", 7000)


@settings(max_examples=200)
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
def test_bit_flipped_packets_are_dropped_or_harmless(flips):
    ring = Keyring([KEY])
    core = fresh(ring)
    p = Peer(NodeId("10.0.0.2", 8000, 1), core.config, ring)
    original = p.packet(codec.ping(1, core.identity), codec.alive(p.id, 3, b"m"))
    data = bytearray(original)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    core.handle_datagram(p.addr, bytes(data), 1.0)
    # Authenticated encryption: any change at all is caught and counted.
    assert core.stats.malformed == (0 if bytes(data) == original else 1)


# -- invariants over event sequences --------------------------------------------------------


class CheckedQueue(BroadcastQueue):
    """A shadow count of every update's sends, checked against the limit at each send."""

    __slots__ = ("_counts", "_keys", "max_ratio")

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict = {}
        self._keys: dict = {}
        self.max_ratio = 0.0

    def push(self, key, part, known_by=None):
        super().push(key, part, known_by)
        self._counts[key] = 0
        self._keys[part] = key

    def fill(self, budget, limit, dest=None, audience=None):
        out = super().fill(budget, limit, dest, audience)
        assert sum(map(len, out)) <= budget
        for part in out:
            key = self._keys[part]
            self._counts[key] += 1
            assert self._counts[key] <= limit, (key, self._counts[key], limit)
            self.max_ratio = max(self.max_ratio, self._counts[key] / limit)
        return out


actions = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.floats(0.05, 5.0)),
        st.tuples(st.just("crash"), st.integers(0, 5)),
        st.tuples(st.just("restart"), st.integers(0, 5)),
        st.tuples(st.just("leave"), st.integers(0, 5)),
        st.tuples(st.just("broadcast"), st.integers(0, 5), st.binary(max_size=600)),
        st.tuples(st.just("meta"), st.integers(0, 5), st.binary(max_size=200)),
        st.tuples(st.just("block"), st.integers(0, 5), st.integers(0, 5)),
        st.tuples(
            st.just("heal"),
        ),
        st.tuples(st.just("loss"), st.sampled_from([0.0, 0.1, 0.3])),
    ),
    max_size=25,
)


@pytest.mark.parametrize("encrypted", [False, True])
@settings(max_examples=40)
@given(seed=st.integers(0, 2**32), steps=actions)
def test_invariants_hold_for_any_event_sequence(encrypted, seed, steps):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("swim.core.BroadcastQueue", CheckedQueue)
        run_sequence(encrypted, seed, steps)


def run_sequence(encrypted: bool, seed: int, steps: list) -> None:
    config = Config.local(label="prop", gossip_to_the_dead_time=5.0)
    ring = Keyring([KEY]) if encrypted else None
    net = LocalNetwork(seed=seed, config=config, jitter=0.004)
    sizes: list[int] = []
    net.on_effect = lambda core, eff: sizes.append(len(eff.data)) if isinstance(eff, Send) else None
    ports = [7000 + i for i in range(6)]
    first = net.add(ports[0], keyring=ring)
    for p in ports[1:]:
        net.add(p, seeds=[first.addr], keyring=ring)

    seen_inc: dict = {}  # (observer addr, identity) -> highest incarnation observed
    final: dict = {}  # (observer addr, identity) -> True once seen DOWN/LEFT

    def check() -> None:
        for addr, core in net.nodes.items():
            mine = (addr, core.identity)
            assert core.incarnation >= seen_inc.get(mine, 0)
            seen_inc[mine] = core.incarnation
            assert 0 <= core.awareness.score < config.awareness_max_multiplier
            for m in core.all_members():
                key = (addr, m.id)
                assert m.incarnation >= seen_inc.get(key, 0), "incarnation went back"
                seen_inc[key] = m.incarnation
                if final.get(key):
                    assert not m.state.active, "down is final for an identity"
                if m.state in (State.DOWN, State.LEFT):
                    final[key] = True
        assert all(s <= config.max_packet_size for s in sizes)

    net.run_for(1.0)
    check()
    for step in steps:
        kind = step[0]
        addr = (net.host, ports[step[1]]) if kind not in ("run", "loss", "heal") else None
        if kind == "run":
            net.run_for(step[1])
        elif kind == "crash" and addr in net.nodes and len(net.nodes) > 1:
            net.crash(addr)
        elif kind == "restart" and addr not in net.nodes:
            alive = sorted(net.nodes)
            net.add(addr[1], seeds=alive[:1], keyring=ring)
        elif kind == "leave" and addr in net.nodes and not net.nodes[addr].leaving:
            net.apply(net.nodes[addr], net.nodes[addr].leave(net.now))
        elif kind in ("broadcast", "meta") and addr in net.nodes:
            core = net.nodes[addr]
            if kind == "broadcast":
                net.apply(core, core.broadcast(step[2], net.now))
            else:
                net.apply(core, core.set_meta(step[2], net.now))
        elif kind == "block":
            net.blocked[(net.host, ports[step[1]]), (net.host, ports[step[2]])] = None
        elif kind == "heal":
            net.blocked.clear()
        elif kind == "loss":
            net.loss = step[1]
        check()
    net.run_for(3.0)
    check()
