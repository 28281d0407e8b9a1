"""Runs one agent in its own process (for SIGKILL tests): ``python agent_proc.py CONFIG.json``.

Prints one JSON line with the agent's addresses once it is up, then runs until killed."""

from __future__ import annotations

import json
import sys

import anyio

from corrosion import Agent, Config


async def main(path: str) -> None:
    with open(path) as f:
        config = Config.from_mapping(json.load(f))
    async with Agent(config) as agent:
        host, port = agent.api_addrs[0]
        ghost, gport = agent.swim.address
        info = {
            "api": f"{host}:{port}",
            "gossip": f"{ghost}:{gport}",
            "actor": agent.actor_id.hex(),
        }
        print(json.dumps(info), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
