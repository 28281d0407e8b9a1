"""docs/orchestrator.md's Machines API examples, run as written: the section's TOML config starts a
real agent (process driver, real processes), then every curl block runs in order, with the real
curl binary, as one session. Each answer must have the status listed here and match the JSON
block the docs show after the command: every documented key present, every value equal (ids,
nonces and times compared by shape, abridged objects allowed). The "Health checks" section runs
the same way on an agent of its own, with its shell steps too; there each GET is repeated until
its answer matches, since checks change on their own schedule."""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import free_port

from corrosion import Agent, Config
from corrosion.runtime.extensions import load_extensions
from orchestrator.drivers import ProcessDriver

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

DOC = Path(__file__).resolve().parents[2] / "docs" / "orchestrator.md"
SECTION = "## The Machines API"
HEALTH_SECTION = "## Health checks"
OPS_SECTION = "## Volumes and operating a machine"

# the HTTP status of each curl example, in the order of the document
STATUSES = [
    200, 200, 200, 200,  # create, wait, get, list
    201, 409, 200,  # lease, stop without the nonce, lease get
    204, 200, 204,  # metadata set, get, delete
    200, 200, 409,  # cordon, uncordon, start while started
    200, 409, 200, 408, 200, 200,  # slow stop, second stop, runs, wait, cancel, wait
    200, 200, 200, 200,  # restart, stop, wait stopped, get
    200, 200, 501,  # update, wait for the new instance, suspend
    200, 409, 200, 200,  # lease release, destroy started, destroy forced, wait destroyed
    400, 400, 404, 401,  # errors
]  # fmt: skip
# the Health checks section's shell steps (None: not curl, no answer) and curl statuses
HEALTH_STATUSES = [
    200, 200,  # create with a check, get (passing)
    None, 200,  # remove /health, get (critical)
    None, 200,  # restore it, get (passing)
    200, 200,  # stop, get (stopped, no checks)
    400,  # a bad check
]  # fmt: skip
# the Volumes section's curl statuses
OPS_STATUSES = [
    200, 200, 200,  # create with a volume, wait started, logs
    200, 200,  # signal, logs
    200, 408, 200,  # exec, exec timed out, ps
    200, 200, 200, 200, 200,  # stop, wait stopped, start, logs, exec cat the volume
    200, 200, 200, 400,  # events, destroy, wait destroyed, a bad mount
]  # fmt: skip

# values that differ from run to run: only their presence is checked
VOLATILE = {"timestamp", "created_at", "updated_at", "expires_at", "exited_at", "step"}
SHAPES = [
    (re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"), "<time>"),
    (re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b"), "<ulid>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<nonce>"),
    (re.compile(r"\b[0-9a-f]{14}\b"), "<machine id>"),
    (re.compile(r"\b127\.0\.0\.1:\d+\b"), "127.0.0.1:<port>"),
]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def section_blocks(section: str = SECTION) -> list[tuple[str, str, int]]:
    """(info string, text, line) of each fenced block in a section (the Machines API's)."""
    lines = DOC.read_text().splitlines()
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks, i = [], start
    while i < end:
        if lines[i].startswith("```"):
            info, first = lines[i][3:].strip(), i + 1
            i = first
            while lines[i] != "```":
                i += 1
            blocks.append((info, "\n".join(lines[first:i]), first))
        i += 1
    return blocks


def examples() -> tuple[dict[str, Any], list[tuple[str, Any, int]]]:
    """The section's TOML config and its (curl command, documented answer or None, line)."""
    blocks = section_blocks()
    configs = [tomllib.loads(text) for info, text, _ in blocks if info == "toml"]
    assert len(configs) == 1, "the Machines API section shows one agent config"
    out = []
    for n, (info, text, line) in enumerate(blocks):
        if not info.startswith("sh") or not text.startswith("curl "):
            continue
        assert "no-run" in info.split(), f"line {line}: curl examples need a live agent: no-run"
        documented = None
        if n + 1 < len(blocks) and blocks[n + 1][0] == "json":
            documented = json.loads(blocks[n + 1][1])
        out.append((text, documented, line))
    return configs[0], out


def shape(text: str) -> str:
    for pattern, name in SHAPES:
        text = pattern.sub(name, text)
    return text


def matches(documented: Any, real: Any, where: str) -> None:
    if isinstance(documented, dict):
        assert isinstance(real, dict), f"{where}: expected an object, got {real!r}"
        for key, value in documented.items():
            assert key in real, f"{where}: no {key!r} in {real!r}"
            if key not in VOLATILE:
                matches(value, real[key], f"{where}.{key}")
    elif isinstance(documented, list):
        # a list of objects may be abridged to its first elements (the newest events)
        abridged = bool(documented) and all(isinstance(d, dict) for d in documented)
        n = len(documented)
        assert isinstance(real, list), f"{where}: expected a list, got {real!r}"
        assert len(real) >= n if abridged else len(real) == n, f"{where}: {real!r}"
        real = real[:n]
        for i, (d, r) in enumerate(zip(documented, real, strict=True)):
            matches(d, r, f"{where}[{i}]")
    elif isinstance(documented, str):
        assert isinstance(real, str) and shape(real) == shape(documented), f"{where}: {real!r}"
    else:
        assert real == documented and type(real) is type(documented), f"{where}: {real!r}"


def agent_config(documented: dict[str, Any], base: Path) -> Config:
    """The documented config with this test's paths and free ports."""
    data = json.loads(json.dumps(documented))
    data["db"]["path"] = str(base / "state.db")
    data["api"]["addr"] = "127.0.0.1:0"
    data["gossip"]["addr"] = "127.0.0.1:0"
    data["admin"]["path"] = str(base / "admin.sock")
    data["orchestrator"]["machines_path"] = str(base / "machines")
    return Config.from_mapping(data)


def capture(answer: Any, variables: dict[str, str]) -> None:
    """The values later examples use: MID, NONCE, RUN_ID, INSTANCE (the latest seen)."""
    if not isinstance(answer, dict):
        return
    if isinstance(answer.get("id"), str):
        variables["MID"] = answer["id"]
    if isinstance(answer.get("instance_id"), str):
        variables["INSTANCE"] = answer["instance_id"]
    if isinstance(answer.get("run_id"), str):
        variables["RUN_ID"] = answer["run_id"]
    nonce = (answer.get("data") or {}).get("nonce") if "data" in answer else None
    if isinstance(nonce, str):
        variables["NONCE"] = nonce


async def test_machines_api_examples_run_as_documented(tmp_path):
    documented_config, runs = examples()
    assert len(runs) == len(STATUSES), (
        f"{len(runs)} curl examples in {DOC.name} but {len(STATUSES)} statuses listed here"
    )
    # every curl prints the status after the body (curl reads $CURL_HOME/.curlrc)
    (tmp_path / ".curlrc").write_text('write-out = "\\n%{http_code}"\n')
    cfg = agent_config(documented_config, tmp_path)
    try:
        async with Agent(cfg, extensions=load_extensions(cfg)) as agent:
            host, port = agent.api_addrs[0]
            variables = {
                "ORCH": f"http://{host}:{port}",
                "TOKEN": documented_config["api"]["authz"]["bearer-token"],
            }
            for (command, documented, line), status in zip(runs, STATUSES, strict=True):
                env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                       "CURL_HOME": str(tmp_path), **variables}  # fmt: skip
                code, body = await run_step(command, env, line)
                assert code == status, f"line {line}: HTTP {code} {body}"
                if documented is None:
                    assert body == "", f"line {line}: {body}"
                    continue
                answer = json.loads(body)
                matches(documented, answer, f"line {line}")
                capture(answer, variables)
    finally:
        await ProcessDriver(tmp_path / "machines" / "_instances").destroy_all()


def health_steps(section: str = HEALTH_SECTION) -> list[tuple[str, Any, int]]:
    """A section's shell steps (Health checks by default): (command, documented answer or None,
    line); the block that only sets the variables is the test's to provide."""
    blocks = section_blocks(section)
    out = []
    for n, (info, text, line) in enumerate(blocks):
        if not info.startswith("sh") or re.match(r"[A-Z_]+=", text):
            continue
        assert "no-run" in info.split(), f"line {line}: these examples need a live agent: no-run"
        documented = None
        if n + 1 < len(blocks) and blocks[n + 1][0] == "json":
            documented = json.loads(blocks[n + 1][1])
        out.append((text, documented, line))
    return out


async def run_step(command: str, env: dict[str, str], line: int) -> tuple[int | None, str]:
    with anyio.fail_after(120):
        proc = await anyio.run_process(["bash", "-c", command], env=env, check=False)
    assert proc.returncode == 0, (line, proc.stderr.decode())
    out = proc.stdout.decode()
    if not command.startswith("curl "):
        return None, out
    body, _, code = out.rpartition("\n")
    return int(code), body


async def test_health_check_examples_run_as_documented(tmp_path):
    documented_config, _ = examples()
    steps = health_steps()
    assert len(steps) == len(HEALTH_STATUSES), (
        f"{len(steps)} steps in {DOC.name}'s health checks but {len(HEALTH_STATUSES)} listed here"
    )
    (tmp_path / ".curlrc").write_text('write-out = "\\n%{http_code}"\n')
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok\n")
    cfg = agent_config(documented_config, tmp_path)
    try:
        async with Agent(cfg, extensions=load_extensions(cfg)) as agent:
            host, port = agent.api_addrs[0]
            variables = {
                "ORCH": f"http://{host}:{port}",
                "TOKEN": documented_config["api"]["authz"]["bearer-token"],
                "SITE": str(site),
                "PORT": str(free_port()),
            }
            await run_session(steps, HEALTH_STATUSES, variables, tmp_path)
    finally:
        await ProcessDriver(tmp_path / "machines" / "_instances").destroy_all()


async def run_session(
    steps: list[tuple[str, Any, int]], statuses: list[int | None], variables: dict[str, str],
    home: Path,
) -> None:  # fmt: skip
    """Run a section's steps in order, each GET asked again until its answer is the one shown."""
    for (command, documented, line), status in zip(steps, statuses, strict=True):
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "CURL_HOME": str(home),
               **variables}  # fmt: skip
        poll = command.startswith("curl ") and " -X " not in command and " -d " not in command
        with anyio.fail_after(60 if poll else 120):
            while True:
                code, body = await run_step(command, env, line)
                try:
                    assert code == status, f"line {line}: HTTP {code} {body}"
                    if documented is None:
                        assert body == "", f"line {line}: {body}"
                        answer = None
                    else:
                        answer = json.loads(body)
                        matches(documented, answer, f"line {line}")
                    break
                except AssertionError:
                    if not poll:
                        raise
                await anyio.sleep(0.1)
        capture(answer, variables)


async def test_volume_and_operations_examples_run_as_documented(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the process driver mounts volumes only as root (its own mount namespace)")
    documented_config, _ = examples()
    steps = health_steps(OPS_SECTION)
    assert len(steps) == len(OPS_STATUSES), (
        f"{len(steps)} steps in {DOC.name}'s volumes section but {len(OPS_STATUSES)} listed here"
    )
    (tmp_path / ".curlrc").write_text('write-out = "\\n%{http_code}"\n')
    vol = tmp_path / "vol"
    vol.mkdir()
    cfg = agent_config(documented_config, tmp_path)
    try:
        async with Agent(cfg, extensions=load_extensions(cfg)) as agent:
            host, port = agent.api_addrs[0]
            variables = {
                "ORCH": f"http://{host}:{port}",
                "TOKEN": documented_config["api"]["authz"]["bearer-token"],
                "VOL": str(vol),
            }
            await run_session(steps, OPS_STATUSES, variables, tmp_path)
        assert list(vol.iterdir()) == []  # the volume was bound in the machine's namespace only
        assert not (tmp_path / "machines" / "_volumes" / "ops" / "notes").exists()  # destroyed
    finally:
        await ProcessDriver(tmp_path / "machines" / "_instances").destroy_all()
