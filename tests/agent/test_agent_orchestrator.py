"""``[orchestrator]`` in the agent's config, hosted by the orchestrator's agent extension: the
Machines API is served next to corrosion's API, and machine rows published by one worker replicate
to another worker's local replica."""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points

import httpx
import pytest
from agent_helpers import agent_config, rows, seed_addr
from support import start_machine, wait_for

from corrosion import Agent, ConfigError
from corrosion.runtime.extensions import GROUP, load_extensions
from orchestrator.extension import OrchestratorExtension, from_config
from orchestrator.publish import MACHINES_SCHEMA

pytestmark = pytest.mark.anyio


async def test_machine_started_on_one_worker_is_visible_on_another(tmp_path):
    cfg = agent_config(
        tmp_path,
        "w1",
        orchestrator={
            "machines_path": str(tmp_path / "machines"),
            "driver": "fake",
            "worker": "w1",
        },
    )
    (tmp_path / "machines.sql").write_text(MACHINES_SCHEMA)  # every node needs the same schema
    other = agent_config(tmp_path, "w2", with_api=False)
    async with Agent(cfg, extensions=load_extensions(cfg)) as w1:
        other = dataclasses.replace(
            agent_config(tmp_path, "w2", [seed_addr(w1)], with_api=False),
            db=dataclasses.replace(
                other.db, schema_paths=(*other.db.schema_paths, tmp_path / "machines.sql")
            ),
        )
        async with Agent(other) as w2:
            mid = await start_machine(w1.api_addrs[0])
            host, port = w1.api_addrs[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as api:
                # corrosion's API is still there, on the same address
                assert (await api.get("/v1/health")).status_code == 200

            async def replicated() -> bool:
                got = await rows(w2, "SELECT id, app, state, worker FROM machines")
                return got == [(mid, "web", "started", "w1")]

            await wait_for(replicated, what="the started machine's row on the other worker")


def test_the_orchestrator_extension_is_found_by_its_entry_point(tmp_path):
    """What ``corrosion agent`` does with ``[orchestrator]``: the installed metadata names the
    factory (pyproject.toml's entry point; a stale editable install lacks it: reinstall)."""
    found = [ep.value for ep in entry_points(group=GROUP) if ep.name == "orchestrator"]
    assert found == ["orchestrator.extension:from_config"], "pip install -e . to refresh it"
    cfg = agent_config(tmp_path, "w1", orchestrator={"machines_path": str(tmp_path / "m")})
    (ext,) = load_extensions(cfg)
    assert isinstance(ext, OrchestratorExtension) and ext.section == "orchestrator"
    assert ext.config.machines_path == tmp_path / "m"


def test_invalid_orchestrator_section_fails_when_its_extension_is_built(tmp_path):
    """corrosion keeps the table raw; the orchestrator's extension refuses it, naming the key."""
    cfg = agent_config(tmp_path, "bad", with_api=False, orchestrator={"driver": "fake"})
    with pytest.raises(ConfigError, match=r"^\[orchestrator\]: machines_path is required$"):
        load_extensions(cfg)
    with pytest.raises(ConfigError, match=r"^\[orchestrator\]: driver must be one of"):
        from_config({"machines_path": "/tmp/x", "driver": "nope"})
    typo = r"^orchestrator\.drivr: unknown configuration key; did you mean orchestrator\.driver\?$"
    with pytest.raises(ConfigError, match=typo):
        from_config({"machines_path": "/tmp/x", "drivr": "fake"})


async def test_agent_refuses_an_orchestrator_table_without_its_extension(tmp_path):
    """An embedding application that passes no extension for ``[orchestrator]`` is told so at
    start, before anything is opened: the table would otherwise be ignored silently."""
    machines = tmp_path / "machines"
    cfg = agent_config(tmp_path, "w1", orchestrator={"machines_path": str(machines)})
    with pytest.raises(ConfigError, match=r"^\[orchestrator\]: no extension given"):
        async with Agent(cfg):
            pass
    assert not (tmp_path / "w1").exists() and not machines.exists()


def test_a_table_no_installed_extension_serves_fails_in_one_line(tmp_path):
    cfg = agent_config(tmp_path, "w1", orchestrator={"machines_path": str(tmp_path / "m")})
    with pytest.raises(ConfigError) as info:
        load_extensions(cfg, group="corrosion.extensions.none-installed")
    assert str(info.value) == (
        "[orchestrator]: no installed extension serves this table (no entry point "
        "'orchestrator' in the group 'corrosion.extensions.none-installed'); install the "
        "package that provides it, or remove the table"
    )
