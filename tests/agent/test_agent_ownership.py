"""One owner for the replication state: the event loop.

Applying runs in a worker thread while the loop keeps reading the bookkeeping (sync ticks send
the sync state, digests check the apply queue, health and ``corrosion sync generate`` count gaps
and heads). If the worker changed that state itself, a new actor appearing during one of those
reads would raise "dictionary changed size during iteration" on the loop, and the timer loop
would die with it. The worker only computes; the loop installs (``Replicator.install_apply``)."""

from __future__ import annotations

import base64
import random
import sys
import time

import anyio
import pytest
from agent_helpers import TEST_KEY, cluster, wait_for

import crdt
import swim
from corrosion.core.changeset import K_HELLO, Changeset, encode_changeset, encode_control
from corrosion.core.replication import Replicator
from corrosion.runtime.transport import connect

pytestmark = pytest.mark.anyio

LABEL = b"corrosion/0"  # cluster 0's peer streams' associated data
KEYRING = swim.Keyring([base64.b64decode(TEST_KEY)])
ACTORS = 3_000  # each one new to the receiver: every apply batch adds ~1000 actors


@pytest.fixture
def eager_thread_switches():
    """Switch threads far more often than every 5 ms, so a worker thread changing what the loop
    is iterating shows up within one stress run (the race exists at any interval)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def _frames(rng: random.Random) -> list[bytes]:
    """A broadcast stream's hello, then one version from each of ``ACTORS`` fresh actors."""
    ts = int(time.time() * 1000) << 16
    frames = [encode_control(K_HELLO, 0, rng.randbytes(16), "bcast")]
    for i in range(ACTORS):
        change = crdt.Change("kv", crdt.pack_pk([f"k{i}"]), "v", i, 1, 1, None, 1, 0)
        frames.append(encode_changeset(Changeset(rng.randbytes(16), 1, (change,), (0, 0), 0, ts)))
    return frames


async def test_new_actors_during_sync_ticks_leave_the_loop_alive(tmp_path, eager_thread_switches):
    async with cluster(tmp_path, 2, with_api=False, perf={"apply_batch_size": 1000}) as agents:
        a, _b = agents
        frames = _frames(random.Random(13))
        errors: list[str] = []
        reads = 0
        done = anyio.Event()

        def died() -> bool:
            """A task of the agent failed: its task group is cancelling the rest."""
            return a._tg is None or a._tg.cancel_scope.cancel_called

        async def read_on_the_loop() -> None:
            """What /v1/health, metrics and ``corrosion sync generate`` do on the loop."""
            nonlocal reads
            while not done.is_set():
                try:
                    a.sync_state()
                    a.gaps()
                    a.replicator.sync_request()
                except RuntimeError as exc:
                    errors.append(str(exc))
                reads += 1
                await anyio.sleep(0.01)  # the loop's other work goes on between the reads

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_on_the_loop)
            stream = await connect(*a.peer_addr, keyring=KEYRING, aad=LABEL)
            async with stream.stream:
                with anyio.fail_after(120):
                    for frame in frames:
                        await stream.send(frame)
                        if errors or died():
                            break
                await wait_for(
                    lambda: len(a.store.bookie.actors) >= ACTORS or bool(errors) or died(),
                    timeout=120,
                    what="every new actor's version to be applied",
                )
            done.set()
        assert not died(), "a task of the agent died (see the errors at close)"
        assert errors == [], f"{len(errors)} of {reads} reads on the loop failed: {errors[0]}"
        # the timer loop is still alive: it keeps starting sync rounds
        started = a.replicator.stats.syncs_started
        await wait_for(lambda: a.replicator.stats.syncs_started > started, what="a sync round")


async def test_the_agent_learns_peers_through_the_translation_the_simulator_runs(
    tmp_path, monkeypatch
):
    """``Replicator.member_event`` is the one translation of membership events into peers
    (tests/simulations/test_sim_agent.py checks that the simulator calls it too)."""
    seen: list[type] = []
    original = Replicator.member_event

    def spy(self, event):
        seen.append(type(event))
        return original(self, event)

    monkeypatch.setattr(Replicator, "member_event", spy)
    async with cluster(tmp_path, 2, with_api=False) as (a, b):
        await wait_for(lambda: b.actor_id in a.replicator.peers, what="a to know b as a peer")
        assert swim.MemberUp in seen
        assert a.replicator.peers[b.actor_id].addr == b.peer_addr
