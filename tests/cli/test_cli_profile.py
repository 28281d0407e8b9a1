"""``corrosion profile``: a cProfile file of a live agent, taken through the admin socket."""

from __future__ import annotations

import pstats

import anyio
import pytest
from cli_helpers import cli, node_mapping
from support import wait_for
from test_cli_admin import ask

from corrosion import Agent, Config
from corrosion.surfaces import profiling
from corrosion.surfaces.admin_client import AdminError

pytestmark = pytest.mark.anyio


async def test_profile_of_a_live_agent_holds_its_functions(base):
    cfg = Config.from_mapping(node_mapping(base, "a"))
    out = base / "agent.prof"
    async with Agent(cfg) as agent:
        done = anyio.Event()

        async def traffic() -> None:  # the agent works while it is profiled
            i = 0
            while not done.is_set():
                i += 1
                await agent.execute([f"INSERT INTO todos (id) VALUES ({i})"])
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            result = await cli(
                "--admin-path", str(cfg.admin_path), "profile", "--seconds", "1",
                "--out", str(out),
            )  # fmt: skip
            done.set()
        assert result.exit_code == 0, result.output
        assert f"written to {out}" in result.output
        stats = pstats.Stats(str(out))
        files = {filename for filename, _, _ in stats.stats}  # type: ignore[attr-defined]
        functions = {name for _, _, name in stats.stats}  # type: ignore[attr-defined]
        assert any(f.endswith("corrosion/runtime/agent.py") for f in files), sorted(files)[:20]
        assert "execute" in functions


async def test_bad_profile_requests_are_refused(base):
    cfg = Config.from_mapping(node_mapping(base, "a"))
    async with Agent(cfg):
        sock = cfg.admin_path
        for args, message in (
            ({"seconds": 0, "out": str(base / "x.prof")}, "more than 0"),
            ({"seconds": "1", "out": str(base / "x.prof")}, "must be a number"),
            ({"seconds": 1, "out": "relative.prof"}, "must be absolute"),
            ({"seconds": 1, "out": str(base / "no" / "x.prof")}, "does not exist"),
            ({"seconds": 1, "out": str(base)}, "is a directory"),
        ):
            with pytest.raises(AdminError, match=message):
                await ask(sock, "profile", **args)
        assert not (base / "x.prof").exists()

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: ask(sock, "profile", seconds=2, out=str(base / "a.prof")))
            await wait_for(lambda: profiling._running, what="the first profile to start")
            # only one profiler at a time; the first still finishes
            with pytest.raises(AdminError, match="already running"):
                await ask(sock, "profile", seconds=1, out=str(base / "b.prof"))
        assert (base / "a.prof").exists() and not (base / "b.prof").exists()
