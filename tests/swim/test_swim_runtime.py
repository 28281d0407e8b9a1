"""The anyio runtime on real loopback sockets, on asyncio and on trio.

Every wait is on a condition with a generous deadline; nothing asserts a wall-clock duration.
"""

from __future__ import annotations

import os

import anyio
import pytest
from support import wait_for

from swim import (
    BroadcastReceived,
    Config,
    ConfigError,
    Keyring,
    MemberDown,
    MemberUp,
    MemberUpdated,
    MessageReceived,
    State,
    SwimNode,
)
from swim.runtime import run

# Fast timers so a test takes seconds; suspicion still needs several missed probes.
FAST = Config.local(
    probe_interval=0.2,
    probe_timeout=0.1,
    gossip_interval=0.05,
    push_pull_interval=2.0,
    stream_timeout=2.0,
    gossip_to_the_dead_time=5.0,
)
DEADLINE = 30.0


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request):
    if request.param[0] == "asyncio" and request.param != "asyncio":
        pytest.importorskip("uvloop")
    return request.param


def sees(node: SwimNode, others: list[SwimNode]) -> bool:
    """``node`` sees exactly ``others``, alive, under their current identities."""
    want = sorted((o.identity, State.ALIVE) for o in others if o is not node)
    return sorted((m.id, m.state) for m in node.members()) == want


def agree(nodes: list[SwimNode]) -> bool:
    return all(sees(n, nodes) for n in nodes)


@pytest.mark.anyio
async def test_eleven_nodes_join_detect_a_kill_and_see_it_rejoin_renewed():
    ring = lambda: Keyring([b"s" * 32])  # noqa: E731 - one keyring object per node
    config = FAST.replace(label="it")
    async with anyio.create_task_group() as tg:
        nodes = [await tg.start(SwimNode(config, keyring=ring()).serve) for _ in range(11)]
        seed = nodes[0].address
        assert all(n.address[1] != 0 for n in nodes)
        for n in nodes[1:]:
            assert await n.join([seed]) == 1
        await wait_for(lambda: agree(nodes))

        victim = nodes[5]
        old_id, port = victim.identity, victim.address[1]
        await victim.stop()  # abrupt: no leave message, sockets closed
        survivors = [n for n in nodes if n is not victim]
        await wait_for(
            lambda: all(s.core.member(victim.address).state is State.DOWN for s in survivors)
        )
        assert all(s.stats.malformed == 0 for s in survivors)

        back = await tg.start(SwimNode(config, port=port, keyring=ring()).serve)
        assert back.address == victim.address
        assert await back.join([seed]) == 1
        everyone = [*survivors, back]
        await wait_for(lambda: agree(everyone))
        assert back.identity.gen > old_id.gen  # a renewed identity, seen by all
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_wrong_key_wrong_label_or_plaintext_never_join():
    key = os.urandom(32)
    config = FAST.replace(label="blue")
    async with anyio.create_task_group() as tg:
        a = await tg.start(SwimNode(config, keyring=Keyring([key])).serve)
        b = await tg.start(SwimNode(config, keyring=Keyring([key])).serve)
        assert await b.join([a.address]) == 1
        intruders = [
            await tg.start(SwimNode(config, keyring=Keyring([os.urandom(32)])).serve),
            await tg.start(SwimNode(FAST.replace(label="red"), keyring=Keyring([key])).serve),
            await tg.start(SwimNode(config).serve),
        ]
        for x in intruders:
            assert await x.join([a.address]) == 0
            await x.send_message(a.address, b"let me in")
            await x.broadcast(b"hello?")
        await wait_for(lambda: sum(a.stats.dropped.values()) >= 2 * len(intruders))
        assert set(a.stats.dropped) <= {"decrypt", "label", "plaintext"}
        await wait_for(lambda: agree([a, b]))
        for x in intruders:
            assert x.members() == []
            assert all(m.addr != x.address for m in a.all_members() + b.all_members())
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_on_dropped_names_the_source_and_reason_of_unreadable_gossip():
    old, new = os.urandom(32), os.urandom(32)
    async with anyio.create_task_group() as tg:
        # a reads both keys and seals with `old`; x has only `new`; y has a key of its own
        a = await tg.start(SwimNode(FAST, keyring=Keyring([old, new])).serve)
        x = await tg.start(SwimNode(FAST, keyring=Keyring([new])).serve)
        y = await tg.start(SwimNode(FAST, keyring=Keyring([os.urandom(32)])).serve)
        seen: dict[SwimNode, list[tuple]] = {a: [], x: [], y: []}
        for node, calls in seen.items():
            node.on_dropped = lambda src, reason, kind, calls=calls: calls.append(
                (src, reason, kind)
            )
        # a opens x's request and answers sealed with `old`, which x cannot open (nor a's
        # pings to x, now that a knows it)
        assert await x.join([a.address]) == 0
        assert (a.address, "decrypt", "reply") in seen[x]
        assert {call[:2] for call in seen[x]} == {(a.address, "decrypt")}
        assert await y.join([a.address]) == 0  # a cannot open y's request at all
        await y.send_message(a.address, b"let me in")
        await wait_for(lambda: len(seen[a]) >= 2)
        (stream_src, *stream), datagram = seen[a]
        assert stream_src[0] == "127.0.0.1" and stream == ["decrypt", "stream"]
        assert datagram == (y.address, "decrypt", "datagram")
        assert seen[y] == []  # nothing came back to y
        assert a.stats.dropped == {"decrypt": 2}
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_events_broadcasts_messages_meta_and_leave():
    async with anyio.create_task_group() as tg:
        a = await tg.start(SwimNode(FAST, meta=b"api=1").serve)
        events = a.subscribe()
        b = await tg.start(SwimNode(FAST).serve)
        c = await tg.start(SwimNode(FAST).serve)
        assert await b.join([a.address]) == 1 and await c.join([a.address]) == 1
        await wait_for(lambda: agree([a, b, c]))
        assert b.core.member(a.address).meta == b"api=1"

        got: list = []

        async def collect() -> None:
            async for ev in events:
                got.append(ev)

        tg.start_soon(collect)
        ups = lambda: {e.member.addr for e in got if isinstance(e, MemberUp)}  # noqa: E731
        await wait_for(lambda: ups() == {b.address, c.address})

        await b.broadcast(b"to everyone")
        await c.send_message(a.address, b"just you")
        await b.set_meta(b"api=2")
        await wait_for(
            lambda: (
                BroadcastReceived(b.identity, b"to everyone") in got
                and MessageReceived(c.identity, b"just you") in got
                and any(isinstance(e, MemberUpdated) and e.member.meta == b"api=2" for e in got)
            )
        )

        assert await c.leave() is True
        await c.stop()
        await wait_for(lambda: any(isinstance(e, MemberDown) for e in got))
        down = next(e for e in got if isinstance(e, MemberDown))
        assert down.member.addr == c.address and down.member.state is State.LEFT
        assert a.core.member(c.address).state is State.LEFT
        assert b.core.member(c.address).state is State.LEFT
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_garbage_datagrams_and_streams_are_dropped_and_counted():
    async with anyio.create_task_group() as tg:
        a = await tg.start(SwimNode(FAST).serve)
        b = await tg.start(SwimNode(FAST).serve)
        await b.join([a.address])
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
            for junk in (b"", b"\x01", b"\x01\x00\xc1", os.urandom(500), b"\x01\x00" + b"\x91"):
                await udp.sendto(junk, *a.address)
        async with await anyio.connect_tcp(*a.address) as s:
            await s.send(b"\x00\x00\x00\x05hello")
            with pytest.raises(anyio.EndOfStream):  # closed without a reply
                await s.receive()
        await wait_for(lambda: a.stats.malformed >= 5)
        await wait_for(lambda: agree([a, b]))  # still healthy
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_context_manager_form_and_bad_arguments():
    with pytest.raises(ConfigError, match="advertise"):
        SwimNode(FAST, host="0.0.0.0")
    async with SwimNode(FAST) as a, SwimNode(FAST) as b:
        assert await b.join([a.address, ("127.0.0.1", 1)], timeout=5) == 1
        await wait_for(lambda: agree([a, b]))
    await a.aclose()  # idempotent


def test_run_helper_picks_a_loop_and_returns_the_result():
    async def main() -> int:
        async with SwimNode(FAST) as n:
            return n.address[1]

    assert run(main) > 0
    assert run(main, backend="trio") > 0


@pytest.mark.anyio
async def test_events_iterator_yields_membership_changes():
    async with SwimNode(FAST) as a, SwimNode(FAST) as b:
        seen: list = []

        async def consume() -> None:
            async for ev in a.events():
                seen.append(ev)
                if isinstance(ev, MemberUp):
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await wait_for(lambda: a._subscribers != [])
            assert await b.join([a.address]) == 1
        assert [(type(e), e.member.id) for e in seen] == [(MemberUp, b.identity)]


@pytest.mark.anyio
async def test_routed_streams_share_the_gossip_port_with_push_pull():
    """An application's streams opened with a registered preamble reach its handler on the
    gossip port; push/pull streams on the same port still work (the join below is one)."""
    got: list[bytes] = []

    async def echo(stream) -> None:
        data = await stream.receive()
        got.append(data)
        await stream.send(data.upper())

    async with anyio.create_task_group() as tg:
        a_node = SwimNode(FAST)
        a_node.route_streams(b"\xffAPP", echo)
        a = await tg.start(a_node.serve)
        b = await tg.start(SwimNode(FAST).serve)
        assert await b.join([a.address]) == 1  # a push/pull stream to the same port
        async with await anyio.connect_tcp(*a.address) as s:
            await s.send(b"\xffAPP" + b"hello")
            with anyio.fail_after(DEADLINE):
                assert await s.receive() == b"HELLO"
        assert got == [b"hello"]
        # an unknown preamble is an oversized push/pull frame: dropped and counted
        errors = a.runtime_stats.stream_errors
        async with await anyio.connect_tcp(*a.address) as s:
            await s.send(b"\xffXYZ" + b"junk")
            # closed on us (a reset on trio: the junk was never read)
            with (
                anyio.fail_after(DEADLINE),
                pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)),
            ):
                await s.receive()
        assert a.runtime_stats.stream_errors == errors + 1
        await wait_for(lambda: agree([a, b]))
        with pytest.raises(ValueError, match="4 bytes starting with 0xff"):
            a_node.route_streams(b"\x00APP", echo)
        tg.cancel_scope.cancel()
