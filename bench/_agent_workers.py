"""Hosts several agents in one process for bench/agent_bench.py's spread measurement.

``python _agent_workers.py BASE_DIR FIRST_INDEX COUNT SEED N [BROADCAST]``: starts COUNT agents
(``gossip.broadcast``, fanout by default) joined through SEED, prints ``ready`` once every one
of them sees N - 1 members, records when each version is applied (wall clock, comparable across
processes on one machine), and when stdin closes prints one JSON line
``{"actor:version": [times...]}`` and exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_bench import config

from corrosion import Agent


async def main(
    base: str, first: int, count: int, seed: str, n: int, broadcast: str = "fanout"
) -> None:
    applied: dict[str, list[float]] = {}

    def listener(result) -> None:
        t = time.time()
        for actor, version in result.applied:
            applied.setdefault(f"{actor.hex()}:{version}", []).append(t)

    received: dict[str, list[float]] = {}
    if os.environ.get("TRACE_RECEIVE"):
        from corrosion.core import replication
        from corrosion.core.changeset import peek_changeset

        orig = replication.Replicator.handle_frame

        def traced(self, src, data, now, sender=None):
            h = peek_changeset(data)
            if h is not None:
                received.setdefault(f"{h[0].hex()}:{h[1]}", []).append(time.time())
            return orig(self, src, data, now, sender)

        replication.Replicator.handle_frame = traced
    agents = []
    try:
        for i in range(first, first + count):
            agent = Agent(config(Path(base), f"n{i}", [seed], broadcast=broadcast))
            await agent.start()
            agent.apply_listeners.append(listener)
            agents.append(agent)
        while not all(a.alive_members() == n - 1 for a in agents):
            await anyio.sleep(0.1)
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        if received:
            with open(os.environ["TRACE_RECEIVE"] + f".{first}", "w") as f:
                json.dump(
                    {"recv": {k: sorted(v) for k, v in received.items()}, "applied": applied}, f
                )
        print(json.dumps(applied), flush=True)
    finally:
        for a in reversed(agents):
            await a.aclose()


if __name__ == "__main__":
    import os

    if os.environ.get("RELAY_ROUNDS"):
        from corrosion.core import replication

        replication.ReplicationConfig.relay_rounds = int(os.environ["RELAY_ROUNDS"])
    if os.environ.get("DIGEST_REPEATS"):
        from corrosion.core import replication

        replication.ReplicationConfig.digest_repeats = int(os.environ["DIGEST_REPEATS"])
    if os.environ.get("SWITCH"):
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    b, f, c, s, n = sys.argv[1:6]
    mode = sys.argv[6] if len(sys.argv) > 6 else "fanout"
    anyio.run(main, b, int(f), int(c), s, int(n), mode, backend_options={"use_uvloop": True})
