"""Output piped into a reader that stops early (``| head``): every entry point ends with exit
code 1 and nothing on stderr (no ``BrokenPipeError`` traceback, no "Exception ignored" at exit,
no error blaming something else), as the Python documentation's note on SIGPIPE recommends.

The reader here is a pipe whose read end is closed before the command starts, so the first
write fails: what ``head`` does to a command that is still writing, without the race."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from cli_helpers import api_of, node_mapping, short_tmp

from corrosion import Agent, Config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.anyio


def run_into_closed_pipe(
    *argv: str, unbuffered: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``argv`` run by this interpreter with stdout a pipe nobody reads; stdout block-buffered
    (Python's default for a pipe) unless ``unbuffered`` (``PYTHONUNBUFFERED``, ``-u``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, *argv],
            stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, timeout=timeout, cwd=ROOT,
            env=env,
        )  # fmt: skip
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_simulations_scenarios_into_a_closed_pipe(unbuffered: bool) -> None:
    done = run_into_closed_pipe("-m", "simulations", "scenarios", unbuffered=unbuffered)
    assert (done.returncode, done.stderr) == (1, "")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_orchestrator_schema_path_into_a_closed_pipe(unbuffered: bool) -> None:
    done = run_into_closed_pipe("-m", "orchestrator", "schema-path", unbuffered=unbuffered)
    assert (done.returncode, done.stderr) == (1, "")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_corrosion_help_and_keygen_into_a_closed_pipe(unbuffered: bool) -> None:
    for argv in (["--help"], ["keygen"], ["--version"]):
        done = run_into_closed_pipe("-m", "corrosion", *argv, unbuffered=unbuffered)
        assert (done.returncode, done.stderr) == (1, ""), argv


def test_output_still_buffered_at_exit_meets_the_pipe_inside_the_helper() -> None:
    # print() to a pipe is block-buffered: the failure comes at the flush, after sys.exit(0),
    # where Python alone would print "Exception ignored ... BrokenPipeError" and exit 120
    script = textwrap.dedent(
        """
        import sys
        from corrosion.ops.pipes import closed_stdout_exits
        with closed_stdout_exits():
            print("x" * 100)
            sys.exit(0)
        """
    )
    done = run_into_closed_pipe("-c", script)
    assert (done.returncode, done.stderr) == (1, "")
    # the body ran to its end: the write itself did not fail, the flush on the way out did
    script = script.replace("sys.exit(0)", 'print("body done", file=sys.stderr); sys.exit(0)')
    done = run_into_closed_pipe("-c", script)
    assert (done.returncode, done.stderr) == (1, "body done\n")


async def test_corrosion_query_of_many_rows_into_a_closed_pipe() -> None:
    with short_tmp() as base:
        async with Agent(Config.from_mapping(node_mapping(base, "a"))) as agent:
            await agent.execute(
                [
                    "INSERT INTO todos (id, title) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
                    "SELECT i + 1 FROM n WHERE i < 20000) SELECT i, 'row ' || i FROM n"
                ]
            )
            argv = ("-m", "corrosion", "--api-addr", api_of(agent), "query", "SELECT * FROM todos")
            done = await anyio.to_thread.run_sync(lambda: run_into_closed_pipe(*argv))
    assert (done.returncode, done.stderr) == (1, "")


def test_devcluster_into_a_closed_pipe_is_not_a_start_up_error() -> None:
    # before: "error: devcluster could not start: [Errno 32] Broken pipe"
    done = run_into_closed_pipe("-m", "corrosion", "devcluster", "--nodes", "1", "--duration", "60")
    assert (done.returncode, done.stderr) == (1, "")
